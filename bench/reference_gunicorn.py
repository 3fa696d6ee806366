"""gunicorn's settings for the bare Flask reference (bench/reference.py): genapi's default worker class and sizes."""

from gevent import monkey

monkey.patch_all()

from config import Settings  # noqa: E402

defaults = {name: field.default for name, field in Settings.model_fields.items()}
worker_class = defaults["worker_class"]
workers = defaults["web_concurrency"]
worker_connections = defaults["worker_connections"]
backlog = 2048
control_socket_disable = True
