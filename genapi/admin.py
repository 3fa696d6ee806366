"""The admin API, /admin/...: keys made, changed, rotated and revoked at run time, and the audit log of it all.

Admin keys only. Each change is one transaction that also appends its audit row (who, when, what, the key before
and after), so that no change goes unrecorded. The `flask keys ...` commands (genapi.commands) call the same
operations below against the same database.
"""

from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal

from flask import Blueprint, Response, current_app, g, jsonify, request
from limits import parse_many
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError
from sqlalchemy import Engine, insert, select, update

from genapi.auth import authenticate
from genapi.budget_periods import PERIODS, parse_key_budget
from genapi.errors import ApiError
from genapi.keys import Client, new_database_key, new_secret, utc_now
from genapi.models import api_keys, audit_log
from genapi.schemas import WholeNumber, parse_body
from genapi.usage import UsageReport

ENVIRONMENT_ID_PREFIX = "env-"  # API_KEYS and ADMIN_API_KEYS entries, listed as env-<name>
MAX_GRACE_SECONDS = 7 * 24 * 3600
RECENT_USAGE_DAYS = 7  # the usage GET /admin/keys/{id} shows


def _check_rate_limit(value: str | None) -> str | None:
    if value is not None:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError("is not a rate limit; write it like 60/minute or 10/second;500/hour") from None
    return value


def _check_token_budget(value: str | None) -> str | None:
    """Budget.parse's notation, or `none`; kept as it reads back (`50000/day`), whatever spelling was sent."""
    if value is not None:
        try:
            value = str(parse_key_budget(value))
        except ValueError:
            raise ValueError("is not a token budget; write it like 50000/day (per minute, hour, day or month), or none") from None
    return value


def _as_utc(value: datetime | None) -> datetime | None:
    """A time with a zone -> naive UTC, as the database keeps it; a time without one is taken as UTC."""
    if value is not None and value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


# The limits library's notation, spelt out so that the OpenAPI document says what is accepted.
_ONE_LIMIT = "[0-9]{1,9} *(/|per) *([0-9]{1,9} *)?(second|minute|hour|day|month|year)s?"
RATE_LIMIT_PATTERN = f"^{_ONE_LIMIT}( *[;,] *{_ONE_LIMIT})*$"


def _in_words(explanation: str) -> WrapValidator:
    """A value that does not match its pattern is refused with an explanation: pydantic's own message would show
    the regular expression. The pattern itself stays in the OpenAPI document."""

    def validate(value, handler):
        try:
            return handler(value)
        except ValidationError as error:
            if any(problem["type"] == "string_pattern_mismatch" for problem in error.errors()):
                raise PydanticCustomError("string_pattern_mismatch", explanation) from None
            raise

    return WrapValidator(validate)


KeyName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$"), _in_words("must be 1 to 64 letters, digits, . _ or -")
]
RateLimit = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=RATE_LIMIT_PATTERN), AfterValidator(_check_rate_limit),
    _in_words("is not a rate limit; write it like 60/minute or 10/second;500/hour"),
]
TOKEN_BUDGET_PATTERN = f"^(none|[1-9][0-9]{{0,11}}/({'|'.join(PERIODS)})s?)$"
TokenBudget = Annotated[
    str, StringConstraints(max_length=32, pattern=TOKEN_BUDGET_PATTERN), AfterValidator(_check_token_budget),
    _in_words("is not a token budget; write it like 50000/day (per minute, hour, day or month), or none"),
]
TOKEN_BUDGET_DESCRIPTION = (
    "The key's own token budget, tokens per calendar period in UTC (50000/day; minute, hour, day or month), or "
    "none for no budget at all; null: TOKEN_BUDGET (ADMIN_TOKEN_BUDGET for an admin key)."
)
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Moment = Annotated[datetime, AfterValidator(_as_utc)]


class KeyCreate(BaseModel):
    """The body of POST /admin/keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: KeyName = Field(description="Shown in logs, usage and the audit log; keys that share a name share a rate limit.")
    role: Literal["user", "admin"] = "user"
    rate_limit: RateLimit | None = Field(default=None, description="The key's own limit; null: RATE_LIMIT.")
    allowed_models: list[ModelName] | None = Field(
        default=None, max_length=100, description="The key's own models; null: ALLOWED_MODELS."
    )
    expires_at: Moment | None = Field(default=None, description="When the key stops working (ISO 8601).")
    token_budget: TokenBudget | None = Field(default=None, description=TOKEN_BUDGET_DESCRIPTION)


class KeyUpdate(BaseModel):
    """The body of PATCH /admin/keys/{id}: only the fields given change; null clears one."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: KeyName | None = None
    rate_limit: RateLimit | None = None
    allowed_models: list[ModelName] | None = Field(default=None, max_length=100)
    expires_at: Moment | None = None
    token_budget: TokenBudget | None = Field(default=None, description=TOKEN_BUDGET_DESCRIPTION)


class KeyRotate(BaseModel):
    """The body of POST /admin/keys/{id}/rotate (optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    grace_seconds: WholeNumber = Field(
        default=0, ge=0, le=MAX_GRACE_SECONDS, description="How long the old secret keeps working; 0: it stops now."
    )


ADMIN_REQUEST_MODELS = {"KeyCreate": KeyCreate, "KeyUpdate": KeyUpdate, "KeyRotate": KeyRotate}


class KeyView(BaseModel):
    """A key as the admin API shows it: never its secret, never a digest."""

    id: str
    name: str
    role: Literal["user", "admin"]
    source: Literal["database", "environment"]
    status: Literal["active", "expired", "revoked"]
    rate_limit: str | None
    allowed_models: list[str] | None
    token_budget: str | None = Field(description=TOKEN_BUDGET_DESCRIPTION)
    expires_at: str | None
    revoked_at: str | None
    created_at: str | None
    updated_at: str | None


class KeyDetail(KeyView):
    """A key with its usage of the last seven days."""

    usage: UsageReport


class CreatedKey(KeyView):
    """What POST /admin/keys and rotate answer with: the key, this once and never again."""

    key: str = Field(description="The whole key, gk_<id>_<secret>; only its secret's digest is stored.")


class RotatedKey(CreatedKey):
    """What rotate answers with: the new key, and until when the old one still works."""

    previous_valid_until: str | None = Field(description="When the old secret stops working; null: it stopped at once.")


class KeyList(BaseModel):
    data: list[KeyView]


class AuditView(BaseModel):
    id: int
    at: str
    actor: str
    action: str
    key_id: str
    before: dict | None
    after: dict | None


class AuditList(BaseModel):
    data: list[AuditView]


def iso(moment: datetime | None) -> str | None:
    return moment.replace(tzinfo=timezone.utc).isoformat() if moment else None


def key_view(row, now: datetime | None = None) -> dict:
    """A key's public fields, from its row (a mapping of column names): never its digests."""
    now = now or utc_now()
    status = "revoked" if row["revoked_at"] else "expired" if row["expires_at"] and now >= row["expires_at"] else "active"
    return {
        "id": row["id"],
        "name": row["name"],
        "role": row["role"],
        "source": "database",
        "status": status,
        "rate_limit": row["rate_limit"],
        "allowed_models": row["allowed_models"],
        "token_budget": row["token_budget"],
        "expires_at": iso(row["expires_at"]),
        "revoked_at": iso(row["revoked_at"]),
        "created_at": iso(row["created_at"]),
        "updated_at": iso(row["updated_at"]),
    }


def environment_view(client: Client) -> dict:
    return {
        "id": ENVIRONMENT_ID_PREFIX + client.name,
        "name": client.name,
        "role": "admin" if client.is_admin else "user",
        "source": "environment",
        "status": "active",
        "rate_limit": None,
        "allowed_models": None,
        "token_budget": None,
        "expires_at": None,
        "revoked_at": None,
        "created_at": None,
        "updated_at": None,
    }


def audit_view(entry) -> dict:
    return {
        "id": entry["id"],
        "at": iso(entry["at"]),
        "actor": entry["actor"],
        "action": entry["action"],
        "key_id": entry["key_id"],
        "before": entry["before"],
        "after": entry["after"],
    }


class KeyNotFound(Exception):
    pass


class KeyFromEnvironment(Exception):
    pass


class KeyRevoked(Exception):
    """A revoked key stays revoked: it cannot be changed or given a new secret."""


# The operations, shared by the admin API and the CLI. Each takes the database's engine and the actor's name; a
# change and its audit row are one transaction.


def _audit(connection, actor: str, action: str, key_id: str, before: dict | None, after: dict | None, now: datetime):
    connection.execute(
        insert(audit_log).values(at=now, actor=actor, action=action, key_id=key_id, before=before, after=after)
    )


def _load(connection, key_id: str) -> dict:
    """A database key's row, as a dict of its columns."""
    if key_id.startswith(ENVIRONMENT_ID_PREFIX):
        raise KeyFromEnvironment(key_id)
    row = connection.execute(select(api_keys).where(api_keys.c.id == key_id)).mappings().first()
    if row is None:
        raise KeyNotFound(key_id)
    return dict(row)


def _load_active(connection, key_id: str) -> dict:
    """A key's row, to change: a revoked key's secret could never be used again, so changing it would mislead."""
    row = _load(connection, key_id)
    if row["revoked_at"] is not None:
        raise KeyRevoked(key_id)
    return row


def _change(connection, actor: str, action: str, row: dict, changes: dict, now: datetime, noted: dict | None = None) -> dict:
    """Write changes to a key's row and the audit row saying so; the key's view after them."""
    before = key_view(row, now)
    changes = changes | {"updated_at": now}
    connection.execute(update(api_keys).where(api_keys.c.id == row["id"]).values(changes))
    after = key_view(row | changes, now)
    _audit(connection, actor, action, row["id"], before, after | (noted or {}), now)
    return after


def create_key(engine: Engine, actor: str, fields: KeyCreate) -> dict:
    """A new key: its view, with the whole key under `key`, once."""
    key_id, key, secret_digest = new_database_key()
    now = utc_now()
    row = {
        "id": key_id, "name": fields.name, "role": fields.role, "secret_digest": secret_digest,
        "previous_secret_digest": None, "previous_valid_until": None, "rate_limit": fields.rate_limit,
        "allowed_models": fields.allowed_models, "token_budget": fields.token_budget, "expires_at": fields.expires_at,
        "revoked_at": None, "created_at": now, "updated_at": now,
    }  # fmt: skip
    view = key_view(row, now)
    with engine.begin() as connection:
        connection.execute(insert(api_keys).values(row))
        _audit(connection, actor, "key.created", key_id, None, view, now)
    return view | {"key": key}


def list_keys(engine: Engine, environment_clients: list[Client]) -> list[dict]:
    with engine.connect() as connection:
        rows = connection.execute(select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)).mappings().all()
    now = utc_now()
    return [environment_view(c) for c in environment_clients] + [key_view(row, now) for row in rows]


def read_key(engine: Engine, key_id: str, environment_clients: list[Client]) -> dict:
    if key_id.startswith(ENVIRONMENT_ID_PREFIX):
        for client in environment_clients:
            if ENVIRONMENT_ID_PREFIX + client.name == key_id:
                return environment_view(client)
        raise KeyNotFound(key_id)
    with engine.connect() as connection:
        return key_view(_load(connection, key_id))


def update_key(engine: Engine, actor: str, key_id: str, fields: KeyUpdate) -> dict:
    now = utc_now()
    changes = fields.model_dump(exclude_unset=True)
    if "name" in changes and changes["name"] is None:
        changes.pop("name")  # a key always has a name
    with engine.begin() as connection:
        row = _load_active(connection, key_id)
        if all(row[field] == value for field, value in changes.items()):  # nothing changes: nothing is recorded
            return key_view(row, now)
        return _change(connection, actor, "key.updated", row, changes, now)


def revoke_key(engine: Engine, actor: str, key_id: str) -> dict:
    """Revoke a key, at once; revoking one already revoked changes nothing and records nothing."""
    now = utc_now()
    with engine.begin() as connection:
        row = _load(connection, key_id)
        if row["revoked_at"] is not None:
            return key_view(row, now)
        return _change(connection, actor, "key.revoked", row, {"revoked_at": now}, now)


def rotate_key(engine: Engine, actor: str, key_id: str, grace_seconds: int) -> dict:
    """A new secret for the key; the old one stops now, or after grace_seconds."""
    now = utc_now()
    key, secret_digest = new_secret(key_id)
    with engine.begin() as connection:
        row = _load_active(connection, key_id)
        if grace_seconds:
            previous = {"previous_secret_digest": row["secret_digest"],
                        "previous_valid_until": now + timedelta(seconds=grace_seconds)}  # fmt: skip
        else:
            previous = {"previous_secret_digest": None, "previous_valid_until": None}
        noted = {"grace_seconds": grace_seconds, "previous_valid_until": iso(previous["previous_valid_until"])}
        after = _change(connection, actor, "key.rotated", row, previous | {"secret_digest": secret_digest}, now, noted)
    return after | {"key": key, "previous_valid_until": noted["previous_valid_until"]}


def read_audit(engine: Engine, key_id: str | None, limit: int) -> list[dict]:
    """The newest entries, or one key's; KeyNotFound for an id no database key has (keys are never deleted)."""
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if key_id:
        query = query.where(audit_log.c.key_id == key_id)
    with engine.connect() as connection:
        if key_id and not key_id.startswith(ENVIRONMENT_ID_PREFIX):
            _load(connection, key_id)
        return [audit_view(entry) for entry in connection.execute(query).mappings()]


# The blueprint.

admin = Blueprint("admin", __name__, url_prefix="/admin")


@admin.before_request
def only_admins() -> None:
    if not authenticate().is_admin:
        raise ApiError(403, "This endpoint is for admin keys only.", code="admin_only")


def genapi_state(name: str):
    return current_app.extensions["genapi"][name]


def engine() -> Engine:
    return genapi_state("database").engine


def read_body(model: type[BaseModel], optional: bool = False):
    """The validated JSON body; with `optional`, an empty body means every default."""
    if optional and not request.get_data(cache=True):
        return model()
    if not request.is_json:
        raise ApiError(415, "The body must be JSON, sent with Content-Type: application/json.", code="unsupported_media_type")
    return parse_body(model, request.get_data(cache=False))


def changed(key_id: str) -> None:
    """This worker sees the change at once; every other within KEY_CACHE_SECONDS."""
    genapi_state("keys").database_keys.forget(key_id)


def not_found(key_id: str) -> ApiError:
    return ApiError(404, f"No key has the id {key_id[:64]!r}.", code="key_not_found")


def database_key_must_exist(key_id: str) -> None:
    """A 404 for an id no database key has: keys are revoked, never deleted, so it can only be a wrong id."""
    try:
        read_key(engine(), key_id, [])
    except KeyNotFound:
        raise not_found(key_id) from None


def from_environment() -> ApiError:
    message = (
        "This key is set in API_KEYS or ADMIN_API_KEYS, not in the database: the API cannot change, rotate or "
        "revoke it. Remove it from that setting and restart, or make a database key instead."
    )
    return ApiError(409, message, code="key_from_environment")


def revoked(key_id: str) -> ApiError:
    message = f"The key {key_id[:64]!r} is revoked: it cannot be changed or rotated. Make a new key instead."
    return ApiError(409, message, code="key_revoked")


def keyed_operation(operation, key_id: str, *args):
    try:
        result = operation(engine(), g.client.name, key_id, *args)
    except KeyNotFound:
        raise not_found(key_id) from None
    except KeyFromEnvironment:
        raise from_environment() from None
    except KeyRevoked:
        raise revoked(key_id) from None
    changed(key_id)
    return jsonify(result)


@admin.post("/keys")
def post_key():
    fields = read_body(KeyCreate)
    response = jsonify(create_key(engine(), g.client.name, fields))
    response.status_code = 201
    return response


@admin.get("/keys")
def get_keys():
    return jsonify(data=list_keys(engine(), genapi_state("keys").environment_clients))


@admin.get("/keys/<key_id>")
def get_key(key_id: str):
    """One key, with its requests and tokens of the last RECENT_USAGE_DAYS days, by day and model."""
    from genapi.usage import totals

    try:
        view = read_key(engine(), key_id, genapi_state("keys").environment_clients)
    except KeyNotFound:
        raise not_found(key_id) from None
    end = utc_now().date()
    database_id = None if view["source"] == "environment" else view["id"]
    recent = totals(engine(), end - timedelta(RECENT_USAGE_DAYS - 1), end, ("model", "day"), view["name"], database_id, only_key=True)
    return jsonify(view | {"usage": recent})


@admin.get("/usage")
def get_usage():
    """Every key's requests and tokens over a range of days, grouped by key, model and/or day; JSON or CSV."""
    from genapi.usage import GROUPS, as_csv, day_range, invalid_query, totals

    start, end = day_range()
    group_by = tuple(request.args.get("group_by", "key,model,day").split(","))
    if not set(group_by) <= set(GROUPS):
        raise invalid_query("group_by", "group by key, model and/or day, comma-separated")
    key_id = request.args.get("key_id") or None
    if key_id and key_id.startswith(ENVIRONMENT_ID_PREFIX):  # a key of API_KEYS: its rows are known by its name
        # Known by name only, its rows stay readable after it left API_KEYS: no 404 for a name not there now.
        report = totals(engine(), start, end, group_by, key_id[len(ENVIRONMENT_ID_PREFIX):], None, only_key=True)
    else:
        if key_id:
            database_key_must_exist(key_id)
        report = totals(engine(), start, end, group_by, key_id=key_id, only_key=key_id is not None)
    if request.accept_mimetypes.best_match(["application/json", "text/csv"]) == "text/csv":
        return Response(as_csv(report), content_type="text/csv; charset=utf-8")
    return jsonify(report)


@admin.patch("/keys/<key_id>")
def patch_key(key_id: str):
    return keyed_operation(update_key, key_id, read_body(KeyUpdate))


@admin.delete("/keys/<key_id>")
def delete_key(key_id: str):
    return keyed_operation(revoke_key, key_id)


@admin.post("/keys/<key_id>/rotate")
def post_rotate(key_id: str):
    return keyed_operation(rotate_key, key_id, read_body(KeyRotate, optional=True).grace_seconds)


@admin.get("/audit")
def get_audit():
    limit = request.args.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 1000:
        raise ApiError(422, "limit must be a whole number from 1 to 1000.", code="validation_error", param="limit",
                       fields=[{"param": "limit", "message": "must be a whole number from 1 to 1000"}])
    key_id = request.args.get("key_id") or None
    try:
        return jsonify(data=read_audit(engine(), key_id, int(limit)))
    except KeyNotFound:
        raise not_found(key_id) from None
