"""Rate limits through Flask-Limiter: RATE_LIMIT per client key; AUTH_FAILURE_LIMIT and INVALID_REQUEST_LIMIT per
client address.

Counts live in Redis when REDIS_URL is set, so every worker and instance shares them; otherwise in this process.
While Redis fails or refuses writes, each process counts in its own memory (genapi.limit_storage) and tries
Redis again every few seconds; nothing about it becomes a 500.
"""

import functools
import ipaddress
import logging
import time

from flask import Flask, current_app, g, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded
from limits import RateLimitItem, parse

from config import Settings
from genapi import metrics
from genapi.errors import ApiError, error_response
from genapi.keys import Client
from genapi.limit_storage import RedisOrMemoryStorage
from genapi.redis_state import RedisState

log = logging.getLogger("genapi")

PER_KEY = "per-key"  # one bucket per client name, shared by /generate and /generate/batch
AUTH_FAILURES = "auth-failures"  # one bucket per client address
INVALID_REQUESTS = "invalid-requests"  # one bucket per client address
# The codes of requests refused for their body or their options: each costs parsing, and none counts against the
# key's own limit, so a client that keeps sending them is limited by INVALID_REQUEST_LIMIT instead.
INVALID_REQUEST_CODES = {"invalid_json", "validation_error", "unsupported_media_type", "body_too_large", "model_not_allowed"}

# A moving window is exact at every instant (no double burst across a window edge), and a hit that does not fit
# is not counted, so a refused batch costs nothing.
STRATEGY = "moving-window"


# An IPv6 address with a zone is at most this long; anything longer is not an address.
MAX_ADDRESS_CHARS = 64


def client_address() -> str:
    """The caller's address; X-Forwarded-For counts only through TRUSTED_PROXIES (werkzeug's ProxyFix).

    A forwarded address that is not an IP address (too long, or any other text a client put in the header) is not
    believed: the request counts as the connection's own, the proxy's, so a forger can neither name another
    client's bucket nor choose the Redis key names of its own.
    """
    address = request.remote_addr or "unknown"
    if "werkzeug.proxy_fix.orig" not in request.environ:
        return address
    try:
        if len(address) <= MAX_ADDRESS_CHARS:
            return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    return request.environ["werkzeug.proxy_fix.orig"].get("REMOTE_ADDR") or "unknown"


def client_name() -> str:
    return g.client.name


def authentication_failed(_response) -> bool:
    return g.get("authentication_failed", False)


def request_was_invalid(_response) -> bool:
    return g.get("error_code") in INVALID_REQUEST_CODES


def build_limiter(app: Flask, settings: Settings, redis_state: RedisState | None) -> Limiter:
    """Flask-Limiter bound to the app, with the per-address limit on failed authentication applied to every route."""
    storage = {"storage_uri": "memory://"}
    if redis_state:
        storage = {
            "storage_uri": RedisOrMemoryStorage.STORAGE_SCHEME[redis_state.url.startswith("rediss://")] + "://",
            "storage_options": {"redis_state": redis_state, "key_prefix": f"{redis_state.key_prefix}limits"},
        }
    limiter = Limiter(
        key_func=client_address,
        application_limits=[
            # Checked before every request, counted only after one whose key was missing or wrong.
            ApplicationLimit(settings.auth_failure_limit, scope=AUTH_FAILURES, deduct_when=authentication_failed),
            # Checked before every request, before its body is read; counted after one refused for its body.
            ApplicationLimit(settings.invalid_request_limit, scope=INVALID_REQUESTS, deduct_when=request_was_invalid),
        ],
        strategy=STRATEGY,
        swallow_errors=True,  # the storage serves from memory when Redis fails; anything else is logged, never a 500
        headers_enabled=False,  # send_rate_limit_headers below does it (see its docstring)
        **storage,
    )
    limiter.init_app(app)
    app.extensions["genapi"] |= {"limiter": limiter, "key_limits": KeyLimits(settings)}
    app.after_request(send_rate_limit_headers)
    app.register_error_handler(RateLimitExceeded, rate_limited)
    return limiter


class KeyLimits:
    """RATE_LIMIT, and ADMIN_RATE_LIMIT for admins, parsed once: the per-key limit of each request.

    A database key's own rate_limit replaces them for that key.
    """

    def __init__(self, settings: Settings):
        self.user = parse(settings.rate_limit)
        admin = settings.admin_rate_limit
        self.admin = self.user if not admin else None if admin == "none" else parse(admin)

    def of(self, client: Client) -> RateLimitItem | None:
        if client.rate_limit:
            return parsed_limit(client.rate_limit)
        return self.admin if client.is_admin else self.user


@functools.lru_cache(maxsize=1024)
def parsed_limit(text: str) -> RateLimitItem:
    """A key's own limit, parsed once per process (a key's text was checked when it was set)."""
    return parse(text)


def charge(cost: int) -> None:
    """Count `cost` requests against the calling client's limit, all or none: 429 when fewer are left.

    This goes straight to Flask-Limiter's rate-limiting strategy (`Limiter.limiter`): Flask-Limiter's evaluation
    of a limit costs ~0.1 ms of CPU per request, a fifteenth of the service's budget (docs/cpu-profile.md),
    and the client and the cost are only known here, in the view. While Redis is unusable, the storage counts in
    this process's memory.
    """
    limit = current_app.extensions["genapi"]["key_limits"].of(g.client)
    if limit is None:
        return
    if cost > limit.amount:  # no wait would ever let it through: say so, rather than 429 and Retry-After
        message = f"{cost} prompts are more than this key's whole rate limit ({limit}); send fewer at a time."
        fields = [{"param": "prompts", "message": message}]
        raise ApiError(422, message, code="over_rate_limit", param="prompts", fields=fields)
    strategy = current_app.extensions["genapi"]["limiter"].limiter
    bucket = (g.client.name, PER_KEY)
    allowed = strategy.hit(limit, *bucket, cost=cost)
    reset_at, remaining = strategy.get_window_stats(limit, *bucket)
    g.key_window = (limit, int(reset_at) + 1, remaining)
    if not allowed:
        message = f"Rate limit exceeded for this key ({limit}); retry after Retry-After seconds."
        raise too_many_requests(message, "rate_limit_exceeded", int(reset_at) + 1)


def too_many_requests(message: str, code: str, reset_at: int | None) -> ApiError:
    """A 429 with Retry-After: the seconds until the window lets the next request in."""
    retry_after = max(1, reset_at - int(time.time())) if reset_at else 60
    metrics.count_rate_limited()
    log.info("429 %s: %s", code, client_name() if "client" in g else client_address())
    return ApiError(429, message, code=code, headers={"Retry-After": str(retry_after)})


def send_rate_limit_headers(response):
    """X-RateLimit-* for the key's own limit, or, on a 429 from the per-address limit, for that limit.

    Written here rather than by Flask-Limiter's headers_enabled, which in 4.x also stamps Retry-After on every
    answer and overrides the upstream's own Retry-After on our 503s.
    """
    window = g.get("key_window") or (auth_failure_window() if response.status_code == 429 else None)
    if window:
        limit, reset_at, remaining = window
        response.headers["X-RateLimit-Limit"] = str(limit.amount)
        response.headers["X-RateLimit-Remaining"] = str(max(0, remaining))
        response.headers["X-RateLimit-Reset"] = str(reset_at)
    return response


def auth_failure_window():
    """The per-address limit that refused this request, with its (reset time, remaining), or None."""
    current = current_app.extensions["genapi"]["limiter"].current_limit
    if current is None:
        return None
    return current.limit, current.reset_at, current.remaining


def rate_limited(exc: RateLimitExceeded):
    """Flask-Limiter's 429 (a per-address limit: failed authentications, invalid requests), in the one error shape."""
    window = auth_failure_window()
    reset_at = window[1] if window else None
    if exc.limit.scope == INVALID_REQUESTS:
        message = f"Too many invalid requests from this address ({exc.limit.limit}); fix them, then retry later."
        return error_response(too_many_requests(message, "too_many_invalid_requests", reset_at))
    message = f"Too many failed authentications from this address ({exc.limit.limit}); retry later."
    return error_response(too_many_requests(message, "too_many_auth_failures", reset_at))
