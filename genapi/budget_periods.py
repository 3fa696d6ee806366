"""A token budget's value, tokens per calendar period in UTC, and the period a moment falls in.

Apart from genapi.budgets so that config.py can check TOKEN_BUDGET without importing the request path.
"""

import calendar
from dataclasses import dataclass
from datetime import datetime, timezone

PERIODS = ("minute", "hour", "day", "month")


@dataclass(frozen=True)
class Budget:
    """A number of tokens per calendar period in UTC: `200000/day`."""

    tokens: int
    period: str

    def __str__(self) -> str:
        return f"{self.tokens}/{self.period}"

    @classmethod
    def parse(cls, text: str) -> "Budget":
        amount, _, period = text.strip().partition("/")
        period = period.strip().lower().removesuffix("s")
        if not amount.strip().isdigit() or int(amount) < 1 or period not in PERIODS:
            raise ValueError(f"{text!r} is not a token budget; write it like 200000/day (per minute, hour, day or month)")
        return cls(int(amount), period)


class NoBudget:
    """A key's own budget of `none`: no budget at all, over TOKEN_BUDGET and ADMIN_TOKEN_BUDGET."""

    def __str__(self) -> str:
        return NO_BUDGET_TEXT

    def __repr__(self) -> str:
        return "NO_BUDGET"


NO_BUDGET_TEXT = "none"
NO_BUDGET = NoBudget()


def parse_key_budget(text: str) -> Budget | NoBudget:
    """A key's own budget: `none`, or a budget in Budget's notation."""
    return NO_BUDGET if text.strip().lower() == NO_BUDGET_TEXT else Budget.parse(text)


def period_bounds(period: str, now: float) -> tuple[str, int]:
    """The calendar period in UTC holding `now`: its name (the same on every instance) and when it ends (Unix time)."""
    moment = datetime.fromtimestamp(now, timezone.utc)
    if period == "month":
        year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
        return moment.strftime("%Y-%m"), calendar.timegm((year, month, 1, 0, 0, 0))
    seconds = {"minute": 60, "hour": 3600, "day": 86400}[period]
    start = int(now) // seconds * seconds
    name = datetime.fromtimestamp(start, timezone.utc).strftime({"minute": "%Y-%m-%dT%H:%M", "hour": "%Y-%m-%dT%H",
                                                                  "day": "%Y-%m-%d"}[period])
    return name, start + seconds
