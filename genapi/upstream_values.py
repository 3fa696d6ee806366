"""What a model server's answer may put in genapi's answers, logs and metrics: its values, bounded and checked.

The same rules hold for a whole answer (genapi.providers), for a stream's chunks (genapi.streaming) and for the
/v1 routes (genapi.v1), which pass the server's own JSON on.
"""

import re

from genapi.errors import ApiError
from genapi.logs import sane_request_id

MAX_MODEL_CHARS = 200
MAX_FINISH_REASON_CHARS = 40
# More tokens than any model's context holds: a count past it is not a count, and would wreck the token metrics.
MAX_TOKEN_COUNT = 10**9

_PATH = re.compile(r"[A-Za-z]:[/\\]")


def looks_like_a_path(reported: str) -> bool:
    return reported.startswith(("/", "./", "../", "~")) or "\\" in reported or bool(_PATH.match(reported))


def model_name(reported, requested: str) -> str:
    """The model the upstream says answered, as a name: a path on the model server's disk becomes its file's name.

    llama.cpp's server, started without an alias, reports the model file's absolute path.
    """
    if not isinstance(reported, str) or not reported:
        return "unknown"
    if looks_like_a_path(reported):
        base = re.split(r"[/\\]", reported)[-1]
        stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
        return stem[:MAX_MODEL_CHARS] or requested
    return reported[:MAX_MODEL_CHARS]


def finish_reason(value) -> str | None:
    return value[:MAX_FINISH_REASON_CHARS] if isinstance(value, str) and value else None


def usage_count(value) -> int | None:
    """A usage count, or None for anything that is not a non-negative integer of at most MAX_TOKEN_COUNT."""
    return value if type(value) is int and 0 <= value <= MAX_TOKEN_COUNT else None


def token_count(value) -> int:
    """A usage count from the upstream's JSON; anything but a non-negative integer counts as 0, a huge one is a 502."""
    if type(value) is int and value > MAX_TOKEN_COUNT:
        raise ApiError(502, "The model server's answer held a usage count that is not one.", code="upstream_bad_response")
    return usage_count(value) or 0


def upstream_id(header, answer_id) -> str | None:
    """The model server's id for a call, for the log: its x-request-id header as OpenAI sends it, else the answer's
    own id, which every compatible server sends; either only if it is short and plain."""
    return sane_request_id(header) or sane_request_id(answer_id)
