"""Who is calling: the X-API-KEY header checked against the key ring, and the admin-only guard."""

import functools

from flask import current_app, g, request

from genapi.errors import ApiError
from genapi.keys import Client, KeyRefused, KeyStoreUnavailable


def missing_key_message(where: str) -> str:
    """A missing key's 401: where to send one, and where keys come from."""
    return (
        f"Send your key in {where}. Keys come from whoever runs this service (its API_KEYS setting); a local "
        "server on the mock provider writes its development keys to its .env file."
    )


def authenticate(bearer: bool = False) -> Client:
    """The client behind the X-API-KEY header: 401 without one, 403 for a key that is not accepted.

    With `bearer` (the /v1 routes, which OpenAI's clients call), `Authorization: Bearer <key>` is taken too.
    """
    presented = request.headers.get("X-API-KEY")
    if not presented and bearer:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        presented = credentials.strip() if scheme.lower() == "bearer" else None
    try:
        client = current_app.extensions["genapi"]["keys"].identify(presented) if presented else None
    except KeyRefused as refusal:
        g.authentication_failed = True
        if refusal.code == "key_revoked":
            raise ApiError(403, "This key has been revoked; ask an admin for a new one.", code="key_revoked") from None
        raise ApiError(403, "This key has expired; ask an admin for a new one.", code="key_expired") from None
    except KeyStoreUnavailable:
        message = "Keys cannot be checked right now: the database is unreachable. Retry in a few seconds."
        raise ApiError(503, message, code="key_store_unavailable", headers={"Retry-After": "5"},
                       error_type="service_unavailable") from None
    if client is None:
        # Counted against the caller's address by AUTH_FAILURE_LIMIT (genapi.limits), to slow down key guessing.
        g.authentication_failed = True
        if not presented:
            if bearer:
                where = "the X-API-KEY header or as Authorization: Bearer"
            elif request.headers.get("Authorization", "").lower().startswith("bearer"):
                where = "the X-API-KEY header (Authorization: Bearer is taken on /v1/* only)"
            else:
                where = "the X-API-KEY header"
            raise ApiError(401, missing_key_message(where), code="missing_api_key")
        raise ApiError(403, "The key is not accepted." if bearer else "The X-API-KEY is not accepted.", code="invalid_api_key")
    g.client = client
    return client


def require_admin(view):
    """Wrap a view so that only an admin key (ADMIN_API_KEYS) reaches it; a user key gets 403 admin_only."""

    @functools.wraps(view)
    def admin_view(*args, **kwargs):
        if not authenticate().is_admin:
            raise ApiError(403, "This endpoint is for admin keys only.", code="admin_only")
        return view(*args, **kwargs)

    return admin_view
