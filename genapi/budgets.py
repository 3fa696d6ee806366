"""Token budgets: tokens per key per calendar period (UTC), reserved before each model call and settled after it.

A request reserves the most it can cost (its prompt's estimated tokens plus its max_tokens) before the model is
called, and is refused with 429 budget_exceeded when the budget cannot cover that. Its answer settles the
reservation to the real usage; a failed call releases it. With REDIS_URL, reserve and settle are each one Lua
script, so every worker of every instance shares one exact count: no burst can spend the same tokens twice.

A period's count is `spent` (settled, real usage) plus `held` (reservations in flight). Each reservation is also a
member of a sorted set, scored by when it lapses: settling removes it, so a reservation is settled once, and one
whose process died before settling it is charged in full when it lapses, never given back unspent.
"""

import logging
import math
import os
import threading
import time
from dataclasses import dataclass

from flask import Flask, current_app, g

from config import UPSTREAM_BUDGET_SECONDS
from genapi import metrics
from genapi.budget_periods import Budget, NoBudget, period_bounds
from genapi.errors import ApiError
from genapi.redis_state import REDIS_RECHECK_SECONDS, RedisState, redis

log = logging.getLogger("genapi")

ENFORCE, SHADOW = "enforce", "shadow"
OPEN = "open"  # TOKEN_BUDGET_ON_REDIS_ERROR: count in each process while Redis fails (else: refuse)

# OpenAI's rule of thumb for English text; each chat message adds a few tokens of framing (role, separators).
CHARACTERS_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4
# A reservation lapses (and is charged in full) this long after the longest a request can take: only a process
# that died mid-request leaves one behind.
RESERVATION_MARGIN_SECONDS = 60
# A period's count stays readable in Redis this long after the period ends.
KEEP_AFTER_PERIOD_SECONDS = 86400


def prompt_tokens_estimate(characters: int, messages: int = 1) -> int:
    """A prompt's tokens before the model counts them: its characters over four, plus each message's framing."""
    return -(-characters // CHARACTERS_PER_TOKEN) + TOKENS_PER_MESSAGE * messages


@dataclass(frozen=True)
class BudgetState:
    """What the X-Budget-* headers say: the budget, what is left of it now, and when its period ends."""

    budget: Budget
    remaining: int
    reset_at: int


@dataclass
class Reservation:
    """Tokens held for one request (or one batch) until it settles; settle() and release() act once."""

    budgets: "Budgets"
    store: object  # the RedisBudgetStore or MemoryBudgetStore it was made in; it settles there
    budget: Budget
    key: str
    member: str
    amount: int
    reset_at: int
    settled: bool = False

    def settle(self, used_tokens: int) -> "BudgetState | None":
        """Charge the real usage in place of the reservation: the budget's state after it, or None."""
        if self.settled:
            return None
        self.settled = True
        return self.budgets.settle(self, max(0, used_tokens))

    def release(self) -> None:
        """The call failed, or cost nothing: give the reservation back."""
        self.settle(0)


# Both scripts are declared with a shebang, so Redis refuses them whole, before they run, when it is out of memory
# or a read-only replica: a script is never left half done.
# KEYS: the period's hash (spent, held), its reservations' sorted set. ARGV: see RedisBudgetStore.reserve.
RESERVE_SCRIPT = """#!lua
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
if #lapsed > 0 then
  local total = 0
  for _, member in ipairs(lapsed) do total = total + tonumber(string.match(member, ':(%d+)$')) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'held', -total)
  redis.call('HINCRBY', KEYS[1], 'spent', total)
end
local counts = redis.call('HMGET', KEYS[1], 'spent', 'held')
local spent, held = tonumber(counts[1] or '0'), tonumber(counts[2] or '0')
local amount = tonumber(ARGV[1])
local over = spent + held + amount > tonumber(ARGV[2])
if over and ARGV[7] == '0' then return {0, spent, held} end
redis.call('HINCRBY', KEYS[1], 'held', amount)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if over then return {2, spent, held + amount} end
return {1, spent, held + amount}
"""
# ARGV: the reservation's member, the tokens really used.
SETTLE_SCRIPT = """#!lua
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'held', -tonumber(string.match(ARGV[1], ':(%d+)$')))
  redis.call('HINCRBY', KEYS[1], 'spent', tonumber(ARGV[2]))
end
local counts = redis.call('HMGET', KEYS[1], 'spent', 'held')
return {tonumber(counts[1] or '0'), tonumber(counts[2] or '0')}
"""


class BudgetStoreUnavailable(Exception):
    """Redis failed or refused a write: the budget cannot be counted there now."""


class RedisBudgetStore:
    """The counts in Redis, shared by every worker and instance; one round trip per reserve and per settle."""

    def __init__(self, redis_state: RedisState):
        self._state = redis_state
        self._reserve = redis_state.client.register_script(RESERVE_SCRIPT)
        self._settle = redis_state.client.register_script(SETTLE_SCRIPT)

    def usable(self) -> bool:
        return self._state.usable()

    def reserve(self, key: str, member: str, amount: int, limit: int, lapses_at: float, ttl: int,
                force: bool) -> tuple[int, int, int]:
        """(1 reserved, 0 refused, 2 over but reserved because `force`), spent, held."""
        now_ms = int(time.time() * 1000)
        args = [amount, limit, now_ms, int(lapses_at * 1000), member, ttl, int(force)]
        result = self._run(self._reserve, key, args)
        return int(result[0]), int(result[1]), int(result[2])

    def settle(self, key: str, member: str, used_tokens: int) -> tuple[int, int]:
        spent, held = self._run(self._settle, key, [member, used_tokens])
        return int(spent), int(held)

    def counts(self, key: str) -> tuple[int, int]:
        """(spent, held) now, for tests and operators."""
        spent, held = self._state.client.hmget(key, "spent", "held")
        return int(spent or 0), int(held or 0)

    def _run(self, script, key: str, args: list):
        try:
            result = script(keys=[key, key + ":reservations"], args=args)
        except redis.RedisError as error:  # down, out of memory, read-only: all the same to a budget
            self._state.failed(error)
            raise BudgetStoreUnavailable(type(error).__name__) from None
        self._state.answered()
        return result


class MemoryBudgetStore:
    """The counts in this process only: without REDIS_URL, or with Redis failing and TOKEN_BUDGET_ON_REDIS_ERROR=open."""

    def __init__(self):
        self._lock = threading.Lock()
        self._periods: dict[str, dict] = {}  # key -> {"spent", "held", "reservations": {member: (amount, lapses_at)}}

    def usable(self) -> bool:
        return True

    def reserve(self, key: str, member: str, amount: int, limit: int, lapses_at: float, ttl: int,
                force: bool) -> tuple[int, int, int]:
        now = time.time()
        with self._lock:
            self._forget_ended(now)
            period = self._periods.setdefault(key, {"spent": 0, "held": 0, "reservations": {}, "ends": now + ttl})
            for lapsed, (held, lapses) in list(period["reservations"].items()):
                if lapses <= now:
                    del period["reservations"][lapsed]
                    period["held"] -= held
                    period["spent"] += held
            over = period["spent"] + period["held"] + amount > limit
            if over and not force:
                return 0, period["spent"], period["held"]
            period["held"] += amount
            period["reservations"][member] = (amount, lapses_at)
            return 2 if over else 1, period["spent"], period["held"]

    def settle(self, key: str, member: str, used_tokens: int) -> tuple[int, int]:
        with self._lock:
            period = self._periods.get(key)
            if period is None:
                return 0, 0
            held = period["reservations"].pop(member, None)
            if held is not None:
                period["held"] -= held[0]
                period["spent"] += used_tokens
            return period["spent"], period["held"]

    def counts(self, key: str) -> tuple[int, int]:
        with self._lock:
            period = self._periods.get(key, {"spent": 0, "held": 0})
            return period["spent"], period["held"]

    def _forget_ended(self, now: float) -> None:
        for key in [key for key, period in self._periods.items() if period["ends"] <= now]:
            del self._periods[key]


class Budgets:
    """TOKEN_BUDGET and ADMIN_TOKEN_BUDGET (or a key's own), their mode, and where they are counted."""

    def __init__(self, settings, redis_state: RedisState | None):
        self.user = Budget.parse(settings.token_budget) if settings.token_budget else None
        admin = settings.admin_token_budget
        self.admin = self.user if not admin else None if admin == "none" else Budget.parse(admin)
        self.mode = settings.token_budget_mode
        # Shadow mode refuses nothing, not even while Redis fails: it counts in each process instead.
        self.fails_open = settings.token_budget_on_redis_error == OPEN or self.mode == SHADOW
        self.redis = RedisBudgetStore(redis_state) if redis_state else None
        self.key_prefix = f"{redis_state.key_prefix}budget:" if redis_state else "budget:"
        self.memory = MemoryBudgetStore()
        # The longest a request can hold a reservation: a stream's whole bound, or one call's upstream budget.
        self.reservation_seconds = max(settings.stream_max_seconds, UPSTREAM_BUDGET_SECONDS) + RESERVATION_MARGIN_SECONDS

    @property
    def configured(self) -> bool:
        return self.user is not None or self.admin is not None

    def of(self, client) -> Budget | None:
        """The client's budget: its own (a key's `budget`, when it has one, `none` included), else the admins' or
        everyone's."""
        if isinstance(client.budget, NoBudget):
            return None
        if client.budget is not None:
            return client.budget
        return self.admin if client.is_admin else self.user

    def key(self, name: str, budget: Budget, period: str) -> str:
        """One count per key name, budget period and calendar period: `genapi:budget:alice:day:2026-12-02`."""
        return f"{self.key_prefix}{name}:{budget.period}:{period}"

    def store(self):
        """Where to count now: Redis while it is usable; while not, this process (open) or nowhere (closed)."""
        if self.redis is None:
            return self.memory
        if self.redis.usable():
            return self.redis
        if self.fails_open:
            return self.memory
        raise unavailable()

    def reserve(self, client, amount: int) -> Reservation | None:
        """Hold `amount` tokens of the client's budget, or raise 429 budget_exceeded (503 budget_unavailable)."""
        budget = self.of(client)
        if budget is None:
            return None
        now = time.time()
        period, reset_at = period_bounds(budget.period, now)
        member = f"{os.urandom(8).hex()}:{amount}"
        lapses_at = now + self.reservation_seconds
        ttl = reset_at - int(now) + KEEP_AFTER_PERIOD_SECONDS
        force = self.mode == SHADOW
        key = self.key(client.name, budget, period)
        store = self.store()
        try:
            outcome, spent, held = store.reserve(key, member, amount, budget.tokens, lapses_at, ttl, force)
        except BudgetStoreUnavailable:
            if not self.fails_open:
                raise unavailable() from None
            store = self.memory
            outcome, spent, held = store.reserve(key, member, amount, budget.tokens, lapses_at, ttl, force)
        left = max(0, budget.tokens - spent - held)
        if outcome == 0:
            g.budget_state = BudgetState(budget, left, reset_at)
            metrics.count_budget_exceeded(ENFORCE)
            log.info("429 budget_exceeded: %s asked for %d tokens, %d left", client.name, amount, left)
            raise exceeded(budget, amount, left, reset_at)
        if outcome == 2:
            metrics.count_budget_exceeded(SHADOW)
            log.warning("token budget %s of %s would refuse a request of %d tokens (%d left); shadow mode lets "
                        "it through", budget, client.name, amount, max(0, budget.tokens - spent - held + amount))
        g.budget_state = BudgetState(budget, left, reset_at)
        return Reservation(self, store, budget, key, member, amount, reset_at)

    def state(self, client) -> BudgetState | None:
        """The client's budget as it stands, for an answer that reserved nothing (a cache hit); None without one."""
        budget = self.of(client)
        if budget is None:
            return None
        period, reset_at = period_bounds(budget.period, time.time())
        key = self.key(client.name, budget, period)
        try:
            spent, held = self.store().counts(key)
        except (ApiError, redis.RedisError):  # Redis failing: a cache hit costs nothing, so it goes without them
            return None
        return BudgetState(budget, max(0, budget.tokens - spent - held), reset_at)

    def settle(self, reservation: Reservation, used_tokens: int) -> BudgetState | None:
        """Charge the real usage; a failure is logged, and the reservation stays held (charged in full)."""
        try:
            spent, held = reservation.store.settle(reservation.key, reservation.member, used_tokens)
        except BudgetStoreUnavailable:
            log.warning("a token reservation of %d could not be settled, Redis failing; it stays charged in full",
                        reservation.amount)
            return None
        metrics.count_budget_tokens(used_tokens)
        return BudgetState(reservation.budget, max(0, reservation.budget.tokens - spent - held), reservation.reset_at)

    def readiness(self) -> str:
        """What budgets do while Redis fails, for /readyz's message."""
        if not self.configured:
            return ""
        if self.fails_open:
            return "; token budgets are counted in each process until it is back"
        return "; requests that call the model are refused (budget_unavailable) until it is back"


def exceeded(budget: Budget, amount: int, left: int, reset_at: int) -> ApiError:
    retry_after = max(1, reset_at - int(time.time()))
    message = (f"This key's token budget ({budget}) has {left} tokens left this {budget.period}, and this request "
               f"may cost up to {amount} (its prompt's estimate plus max_tokens); it resets in {retry_after} s.")
    if amount > budget.tokens:
        message += " Lower max_tokens or the prompt: no reset lets this request through."
    return ApiError(429, message, code="budget_exceeded", headers={"Retry-After": str(retry_after)})


def unavailable() -> ApiError:
    metrics.count_budget_unavailable()
    return ApiError(503, "Token budgets cannot be counted right now (Redis is failing); retry after Retry-After "
                    "seconds.", code="budget_unavailable", error_type="service_unavailable",
                    headers={"Retry-After": str(math.ceil(REDIS_RECHECK_SECONDS))})


def budgets() -> Budgets:
    return current_app.extensions["genapi"]["budgets"]


def reserve(amount: int) -> Reservation | None:
    """Reserve `amount` tokens of the calling client's budget (g.client); None when it has no budget."""
    return budgets().reserve(g.client, amount)


def show_budget() -> None:
    """For an answer that costs nothing (a cache hit): the X-Budget-* headers still say where the budget stands."""
    state = budgets().state(g.client)
    if state is not None:
        g.budget_state = state


def settle(reservation: Reservation | None, used_tokens: int) -> None:
    """Settle in the request: the answer's headers then show what is left after the real usage."""
    state = reservation.settle(used_tokens) if reservation is not None else None
    if state is not None:
        g.budget_state = state


def release(reservation: Reservation | None) -> None:
    settle(reservation, 0)


def send_budget_headers(response):
    """X-Budget-Limit, X-Budget-Remaining and X-Budget-Reset, on every answer of a key with a budget."""
    state = g.get("budget_state")
    if state is not None:
        response.headers["X-Budget-Limit"] = str(state.budget.tokens)
        response.headers["X-Budget-Remaining"] = str(state.remaining)
        response.headers["X-Budget-Reset"] = str(state.reset_at)
    return response


def bind_budgets(app: Flask, settings, redis_state: RedisState | None) -> None:
    app.extensions["genapi"]["budgets"] = Budgets(settings, redis_state)
    app.after_request(send_budget_headers)
