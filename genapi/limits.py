"""Rate limits through Flask-Limiter: RATE_LIMIT per client key, AUTH_FAILURE_LIMIT per client address.

Counts live in Redis when REDIS_URL is set, so every worker and instance shares them; otherwise in this process.
If Redis fails, Flask-Limiter falls back to in-memory counts in each process (fail open, per process) and checks
Redis again with a back-off; nothing about it becomes a 500.
"""

import logging
import time

import redis
from flask import Flask, current_app, g, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from limits.errors import StorageError

from config import Settings
from genapi import metrics
from genapi.errors import ApiError, error_response
from genapi.redis_state import RedisState

log = logging.getLogger("genapi")

PER_KEY = "per-key"  # one bucket per client name, shared by /generate and /generate/batch
AUTH_FAILURES = "auth-failures"  # one bucket per client address

# A moving window is exact at every instant (no double burst across a window edge), and a hit that does not fit
# is not counted, so a refused batch costs nothing.
STRATEGY = "moving-window"


def client_address() -> str:
    """The caller's address; X-Forwarded-For counts only through TRUSTED_PROXIES (werkzeug's ProxyFix)."""
    return request.remote_addr or "unknown"


def client_name() -> str:
    return g.client.name


def authentication_failed(_response) -> bool:
    return g.get("authentication_failed", False)


def build_limiter(app: Flask, settings: Settings, redis_state: RedisState | None) -> Limiter:
    """Flask-Limiter bound to the app, with the per-address limit on failed authentication applied to every route."""
    storage = {"storage_uri": "memory://"}
    if redis_state:
        storage = {
            # limits' RedisStorage only reads the scheme from the URI: the connection is our shared pool.
            "storage_uri": "rediss://" if redis_state.url.startswith("rediss://") else "redis://",
            "storage_options": {
                "connection_pool": redis_state.client.connection_pool,
                "key_prefix": f"{redis_state.key_prefix}limits",
            },
        }
    limiter = Limiter(
        key_func=client_address,
        application_limits=[
            # Checked before every request, counted only after one whose key was missing or wrong.
            ApplicationLimit(settings.auth_failure_limit, scope=AUTH_FAILURES, deduct_when=authentication_failed)
        ],
        strategy=STRATEGY,
        in_memory_fallback_enabled=True,
        swallow_errors=True,  # a Redis failure while counting is logged, never a 500
        headers_enabled=False,  # send_rate_limit_headers below does it (see its docstring)
        **storage,
    )
    limiter.init_app(app)
    per_key = limiter.shared_limit(limit_for_client(settings), scope=PER_KEY, key_func=client_name, cost=charged_cost)
    app.extensions["genapi"] |= {"limiter": limiter, "per_key_limit": per_key}
    app.after_request(send_rate_limit_headers)
    app.register_error_handler(RateLimitExceeded, rate_limited)
    return limiter


def limit_for_client(settings: Settings):
    """The limit of the calling client: RATE_LIMIT, or ADMIN_RATE_LIMIT for an admin ("" means none at all)."""

    def limit() -> str:
        # Flask-Limiter also reads it before the view has authenticated anyone (to plan the request's limits).
        client = g.get("client")
        if client and client.is_admin and settings.admin_rate_limit:
            return "" if settings.admin_rate_limit == "none" else settings.admin_rate_limit
        return settings.rate_limit

    return limit


def charged_cost() -> int:
    return g.rate_limit_cost


def charge(cost: int) -> None:
    """Count `cost` requests against the calling client's limit, all or none: 429 when fewer are left."""
    g.rate_limit_cost = cost
    # Flask-Limiter's documented way to limit from inside a view; the limit reads the client and cost from g.
    with current_app.extensions["genapi"]["per_key_limit"]:
        pass


def current_window():
    """The limit that decided this request and its (reset time, remaining), or None."""
    current = current_app.extensions["genapi"]["limiter"].current_limit
    if current is None:
        return None
    try:
        return current, current.reset_at, max(0, current.remaining)
    except (redis.RedisError, StorageError) as error:
        log.warning("rate-limit headers left out: the limit storage failed (%s)", type(error).__name__)
        return None


def send_rate_limit_headers(response):
    """X-RateLimit-* for the key's own limit, and on a 429 for the limit that refused.

    Written here rather than by Flask-Limiter's headers_enabled, which in 4.x also stamps Retry-After on every
    answer and overrides the upstream's own Retry-After on our 503s.
    """
    current = current_app.extensions["genapi"]["limiter"].current_limit
    if current is None or not (current.request_args[-1] == PER_KEY or response.status_code == 429):
        return response
    window = current_window()
    if window:
        limit, reset_at, remaining = window
        response.headers["X-RateLimit-Limit"] = str(limit.limit.amount)
        response.headers["X-RateLimit-Remaining"] = str(remaining)
        response.headers["X-RateLimit-Reset"] = str(reset_at)
    return response


def rate_limited(exc: RateLimitExceeded):
    """429 in the one error shape, with Retry-After: the seconds until the window lets the next request in."""
    window = current_window()
    retry_after = max(1, window[1] - int(time.time())) if window else 60
    if exc.limit.scope == AUTH_FAILURES:
        message = f"Too many failed authentications from this address ({exc.limit.limit}); retry later."
        error = ApiError(429, message, code="too_many_auth_failures", headers={"Retry-After": str(retry_after)})
    else:
        message = f"Rate limit exceeded for this key ({exc.limit.limit}); retry after Retry-After seconds."
        error = ApiError(429, message, code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})
    metrics.count_rate_limited()
    log.info("429 %s: %s", error.code, client_name() if "client" in g else client_address())
    return error_response(error)
