"""CORS for browser pages on other origins: flask-cors, for the origins in CORS_ORIGINS only (none by default)."""

from flask import Flask, Response, request
from flask_cors import CORS

# What a browser page may send, and read back, beyond the basics.
REQUEST_HEADERS = ["Content-Type", "X-API-KEY", "X-Request-ID", "Cache-Control"]
RESPONSE_HEADERS = ["X-Request-ID", "X-Cache", "Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                    "X-RateLimit-Reset"]  # fmt: skip


def bind_cors(app: Flask, origins: list[str]) -> None:
    """With CORS_ORIGINS set, let those origins call the API; with it empty, add nothing at all."""
    if not origins:
        return
    any_origin = "*" in origins
    CORS(
        app,
        origins="*" if any_origin else origins,
        methods=["GET", "POST"],
        allow_headers=REQUEST_HEADERS,
        expose_headers=RESPONSE_HEADERS,
        max_age=600,
    )

    # genapi answers OPTIONS with its JSON 405 (no route takes it), but a browser needs a 2xx for its preflight:
    # a listed origin's preflight gets an empty 204, to which flask-cors adds its headers. Any other OPTIONS
    # request is answered as before, without CORS headers, so the browser refuses the call.
    @app.before_request
    def answer_preflight():
        origin = request.headers.get("Origin")
        if (
            request.method == "OPTIONS"
            and "Access-Control-Request-Method" in request.headers
            and origin
            and (any_origin or origin in origins)
        ):
            return Response(status=204)
        return None
