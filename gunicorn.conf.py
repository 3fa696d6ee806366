"""gunicorn's settings for genapi, Heroku-style; each says why it has its value."""

import contextlib
import gc
import os
import signal
import tempfile
from pathlib import Path

from config import load_settings
from genapi.logs import configure_logging, log_start_up

# Check the configuration once, in the master: a wrong value stops start-up with one clear message instead of
# every worker crashing in a loop. (It also makes the mock provider's one-time key before the workers fork.)
settings = load_settings()

# The app is loaded once, in the master, and the workers fork from it: the modules (the OpenAI SDK alone is ~25 MB)
# are then shared by every worker instead of loaded into each, which keeps the service under 150 MB in all. A gevent
# worker needs its monkey-patching before the app's modules take their sockets and locks, so with preloading it is
# done here, in the master, first (the worker repeats it, harmlessly).
preload_app = True
if settings.worker_class == "gevent":
    from gevent import monkey

    monkey.patch_all()

# prometheus_client's multiprocess mode: each worker writes its metrics to files in this directory and /metrics
# adds them all up. The variable must be set here, in the master, before the app (preloaded below) imports
# prometheus_client.
# A fresh directory per start, so numbers from an earlier run never leak in; Prometheus handles the reset.
metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="genapi-metrics-")
Path(metrics_dir).mkdir(parents=True, exist_ok=True)
for stale in Path(metrics_dir).glob("*.db"):
    stale.unlink()
os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir

# Heroku routes to $PORT on every interface; locally it is 8000.
bind = f"0.0.0.0:{settings.port}"

# Heroku sets WEB_CONCURRENCY from the dyno's size on most dynos; ours is the default where it does not.
workers = settings.web_concurrency

# A model call spends seconds waiting on the network. gevent workers hold many such calls in flight each, while
# the code on the request path stays plain and synchronous (README, "Worker model"). WORKER_CLASS switches.
worker_class = settings.worker_class
worker_connections = settings.worker_connections  # in-flight requests per gevent worker
threads = settings.threads if settings.worker_class == "gthread" else 1  # in-flight requests per gthread worker

# A worker that has not checked in with the master for this long is killed (for a gevent worker this is its
# heartbeat, not a per-request limit: genapi's own upstream budget keeps requests under Heroku's 30 s router limit).
timeout = 30

# On SIGTERM, in-flight requests get this long to finish, inside the 30 s Heroku gives before SIGKILL.
graceful_timeout = 25

# Streams still running at SIGTERM end this long before graceful_timeout, with an error event the client can see,
# rather than being cut when the worker exits.
STREAM_SHUTDOWN_MARGIN_SECONDS = 2

# Longer than the Heroku router's 90 s idle timeout, so the router, not us, closes idle keep-alive connections.
keepalive = 95

# Heroku collects logs from stdout and stderr. The access log is genapi's own JSON line per request, on stdout
# (genapi/logs.py), which says more than gunicorn's; gunicorn's access line would cost ~0.1 ms of CPU per request
# (README, "Where the CPU goes"), so it is off unless ACCESS_LOG=true, and then it shows the path without the query
# string, where a careless client may have put its key. gunicorn's error log goes to stderr.
accesslog = "-" if settings.access_log else None
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms "%({x-request-id}o)s"'
errorlog = "-"

# The kernel queue of connections not yet accepted: bigger than the 500 clients of the benchmark's widest scenario.
backlog = 2048

# gunicorn 27's control socket sits at one path per user: several instances on one machine would fight over it,
# and nothing here uses gunicornc.
control_socket_disable = True


def when_ready(server):
    """Log the effective configuration once per start, from the master, as JSON like every other line."""
    configure_logging(settings.log_level)
    log_start_up(settings)
    # What the master loaded stays as it is: the collector never walks it again, so it never writes to the pages
    # the workers share with the master (each write would copy a page into that worker).
    gc.freeze()
    if settings.worker_class == "gevent":
        import gevent

        # Building the app started limits' first 10 ms expiry timers (greenlets, once patched): let them finish
        # here, or every forked worker would inherit them half-run and log a KeyError from threading.
        gevent.sleep(0.05)


def post_worker_init(worker):
    """Tell streams of a SIGTERM; in a gevent worker, keep httpcore2's idle-connection checks cheap."""
    if settings.worker_class == "gevent":
        from genapi.upstream_http import probe_idle_connections_without_gevent

        probe_idle_connections_without_gevent()
    from genapi.streaming import begin_shutdown

    handle_exit = worker.handle_exit

    def handle_exit_with_streams(sig, frame):
        # The worker stops taking requests and waits graceful_timeout for those in flight: streams must end by then.
        begin_shutdown(max(0.0, worker.cfg.graceful_timeout - STREAM_SHUTDOWN_MARGIN_SECONDS))
        handle_exit(sig, frame)

    signal.signal(signal.SIGTERM, handle_exit_with_streams)


def child_exit(server, worker):
    """A dead worker's counters stay in the sums; prometheus_client drops only its live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics files, and the directory if nothing else is in it (it may be the operator's)."""
    for metrics_file in Path(metrics_dir).glob("*.db"):
        metrics_file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(metrics_dir).rmdir()
