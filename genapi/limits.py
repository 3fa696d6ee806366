"""Rate limits: RATE_LIMIT per client key; AUTH_FAILURE_LIMIT and INVALID_REQUEST_LIMIT per client address.

They are counted with the limits library (the storage and strategies beneath Flask-Limiter), called directly: each
check is one storage call, where Flask-Limiter's evaluation of a limit cost ~0.1 ms of CPU (docs/cpu-profile.md).
Counts live in Redis when REDIS_URL is set, so every worker and instance shares them; otherwise in this process.
While Redis fails or refuses writes, each process counts in its own memory (genapi.limit_storage) and tries
Redis again every few seconds; nothing about it becomes a 500.
"""

import functools
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import Flask, Response, current_app, g, request
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from config import Settings
from genapi import metrics
from genapi.errors import ApiError
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


def exempt(view_or_blueprint):
    """A view, or a blueprint's views, that no per-address limit checks or counts (health checks, the docs page)."""
    view_or_blueprint.rate_limit_exempt = True
    return view_or_blueprint


@dataclass(frozen=True)
class AddressLimit:
    """A per-address limit: its bucket, its limits, which finished requests count against it, and its 429."""

    scope: str
    limits: tuple[RateLimitItem, ...]
    counts: Callable[[Response], bool]
    code: str
    message: str


class RateLimits:
    """The storage and the limits of one app: per key, tested and counted in the view by charge(); per address,
    tested before every request and counted after one that failed its way (check_address and count_address).

    A moving window is exact at every instant (no double burst across a window edge), and a hit that does not fit
    is not counted, so a refused batch costs nothing. A limit may be several ("10/second;500/hour"): a request
    must fit every one of them.
    """

    def __init__(self, settings: Settings, redis_state: RedisState | None):
        if redis_state:
            storage = RedisOrMemoryStorage(
                RedisOrMemoryStorage.STORAGE_SCHEME[redis_state.url.startswith("rediss://")] + "://",
                redis_state=redis_state,
                key_prefix=f"{redis_state.key_prefix}limits",
            )
        else:
            storage = MemoryStorage()
        self.strategy = MovingWindowRateLimiter(storage)
        self.user = tuple(parse_many(settings.rate_limit))
        admin = settings.admin_rate_limit
        self.admin = self.user if not admin else () if admin == "none" else tuple(parse_many(admin))
        self.per_address = (
            AddressLimit(AUTH_FAILURES, tuple(parse_many(settings.auth_failure_limit)), authentication_failed,
                         code="too_many_auth_failures",
                         message="Too many failed authentications from this address ({}); retry later."),
            AddressLimit(INVALID_REQUESTS, tuple(parse_many(settings.invalid_request_limit)), request_was_invalid,
                         code="too_many_invalid_requests",
                         message="Too many invalid requests from this address ({}); fix them, then retry later."),
        )  # fmt: skip

    def of(self, client: Client) -> tuple[RateLimitItem, ...]:
        """The client's own limits: a database key's rate_limit, or RATE_LIMIT (ADMIN_RATE_LIMIT for admins)."""
        if client.rate_limit:
            return parsed_limits(client.rate_limit)
        return self.admin if client.is_admin else self.user

    def window(self, limit: RateLimitItem, *bucket: str) -> tuple[RateLimitItem, int, int]:
        """(limit, when the window lets the next request in, requests left), for the X-RateLimit-* headers."""
        reset_at, remaining = self.strategy.get_window_stats(limit, *bucket)
        return limit, int(reset_at) + 1, remaining

    def check_address(self) -> None:
        """Before a request: 429 if its address is over a per-address limit, so a guesser learns nothing more."""
        view = current_app.view_functions.get(request.endpoint) if request.endpoint else None
        blueprint = current_app.blueprints.get(request.blueprint) if request.blueprint else None
        if getattr(view, "rate_limit_exempt", False) or getattr(blueprint, "rate_limit_exempt", False):
            g.address_limits_exempt = True
            return
        address = client_address()
        for kind in self.per_address:
            for limit in kind.limits:
                if not self.strategy.test(limit, address, kind.scope):
                    g.rate_window = self.window(limit, address, kind.scope)
                    raise too_many_requests(kind.message.format(limit), kind.code, g.rate_window[1])

    def count_address(self, response) -> None:
        """After a request: one hit on each per-address limit whose kind of failure it was."""
        if g.get("address_limits_exempt"):
            return
        address = None
        for kind in self.per_address:
            if kind.counts(response):
                address = address or client_address()
                for limit in kind.limits:
                    self.strategy.hit(limit, address, kind.scope)


def build_limits(app: Flask, settings: Settings, redis_state: RedisState | None) -> RateLimits:
    """The app's rate limits, with the per-address ones checked before, and counted after, every request."""
    rate_limits = RateLimits(settings, redis_state)
    app.extensions["genapi"]["limits"] = rate_limits
    app.before_request(rate_limits.check_address)

    @app.after_request
    def count_and_show(response):
        rate_limits.count_address(response)
        return send_rate_limit_headers(response)

    return rate_limits


@functools.lru_cache(maxsize=1024)
def parsed_limits(text: str) -> tuple[RateLimitItem, ...]:
    """A key's own limits, parsed once per process (a key's text was checked when it was set)."""
    return tuple(parse_many(text))


def charge(cost: int) -> None:
    """Count `cost` requests against each of the calling client's limits, all or none: 429 when fewer are left.

    The client and the cost are only known here, in the view. While Redis is unusable, the storage counts in this
    process's memory.
    """
    rate_limits: RateLimits = current_app.extensions["genapi"]["limits"]
    limits = rate_limits.of(g.client)
    if not limits:
        return
    for limit in limits:
        if cost > limit.amount:  # no wait would ever let it through: say so, rather than 429 and Retry-After
            message = f"{cost} prompts are more than this key's whole rate limit ({limit}); send fewer at a time."
            fields = [{"param": "prompts", "message": message}]
            raise ApiError(422, message, code="over_rate_limit", param="prompts", fields=fields)
    strategy, bucket = rate_limits.strategy, (g.client.name, PER_KEY)
    refused = None
    if len(limits) > 1:
        # Each is tested before any is hit, so that a request refused by one costs nothing in the others; a request
        # racing another between the test and the hit may still use up a little of the others.
        refused = next((limit for limit in limits if not strategy.test(limit, *bucket, cost=cost)), None)
    if refused is None:
        refused = next((limit for limit in limits if not strategy.hit(limit, *bucket, cost=cost)), None)
    if refused is not None:
        g.rate_window = rate_limits.window(refused, *bucket)
        message = f"Rate limit exceeded for this key ({refused}); retry after Retry-After seconds."
        raise too_many_requests(message, "rate_limit_exceeded", g.rate_window[1])
    # The headers show the limit nearest to refusing.
    g.rate_window = min((rate_limits.window(limit, *bucket) for limit in limits), key=lambda window: window[2])


def too_many_requests(message: str, code: str, reset_at: int | None) -> ApiError:
    """A 429 with Retry-After: the seconds until the window lets the next request in."""
    retry_after = max(1, reset_at - int(time.time())) if reset_at else 60
    metrics.count_rate_limited()
    log.info("429 %s: %s", code, client_name() if "client" in g else client_address())
    return ApiError(429, message, code=code, headers={"Retry-After": str(retry_after)})


def send_rate_limit_headers(response):
    """X-RateLimit-* for the limit that counted this request: the key's own, or the per-address one that refused it.

    Retry-After is left to the 429s themselves: the upstream's own Retry-After on our 503s must stay as it is.
    """
    window = g.get("rate_window")
    if window:
        limit, reset_at, remaining = window
        response.headers["X-RateLimit-Limit"] = str(limit.amount)
        response.headers["X-RateLimit-Remaining"] = str(max(0, remaining))
        response.headers["X-RateLimit-Reset"] = str(reset_at)
    return response
