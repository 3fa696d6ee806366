"""gunicorn's settings for genapi, Heroku-style; each says why it has its value."""

from config import load_settings

# Check the configuration once, in the master: a wrong value stops start-up with one clear message instead of
# every worker crashing in a loop. (It also makes the mock provider's one-time key before the workers fork.)
settings = load_settings()

# Heroku routes to $PORT on every interface; locally it is 8000.
bind = f"0.0.0.0:{settings.port}"

# Heroku sets WEB_CONCURRENCY from the dyno's size on most dynos; ours is the default where it does not.
workers = settings.web_concurrency

# A model call spends seconds waiting on the network. gevent workers hold many such calls in flight each, while
# the code on the request path stays plain and synchronous (README, "Worker model"). WORKER_CLASS switches.
worker_class = settings.worker_class
worker_connections = settings.worker_connections  # in-flight requests per gevent worker
threads = settings.threads if settings.worker_class == "gthread" else 1  # in-flight requests per gthread worker

# A worker silent this long is killed; it matches Heroku's 30 s router limit, past which nobody is listening.
timeout = 30

# On SIGTERM, in-flight requests get this long to finish, inside the 30 s Heroku gives before SIGKILL.
graceful_timeout = 25

# Longer than the Heroku router's 90 s idle timeout, so the router, not us, closes idle keep-alive connections.
keepalive = 95

# Heroku collects logs from stdout and stderr. Its router already logs every request (method, path, status, time),
# so gunicorn's own access line is off unless ACCESS_LOG=true: it costs ~0.1 ms of CPU per request (README, "Where the
# CPU goes"), a tenth of the budget.
accesslog = "-" if settings.access_log else None
errorlog = "-"

# The kernel queue of connections not yet accepted: bigger than the 500 clients of the benchmark's widest scenario.
backlog = 2048

# gunicorn 27's control socket sits at one path per user: several instances on one machine would fight over it,
# and nothing here uses gunicornc.
control_socket_disable = True
