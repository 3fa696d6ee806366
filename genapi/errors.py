"""The one error shape, OpenAI's: {"error": {"message", "type", "param", "code"}}, made here and only here."""

import logging

from flask import Flask, current_app, g, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("genapi")

# The `type` each status is reported as, following OpenAI's names where it has one.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "upstream_overloaded",  # /readyz names its own, service_unavailable
    504: "upstream_timeout",
}


class ApiError(Exception):
    """An answer other than success: raise it anywhere on the request path and the handler below shapes it."""

    def __init__(self, status, message, code=None, param=None, headers=None, fields=None, error_type=None):
        super().__init__(message)
        self.status = status
        self.type = error_type or ERROR_TYPES.get(status, "server_error")
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.fields = fields  # for a 422: [{"param": ..., "message": ...}, ...]

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type}
        error |= {"param": self.param, "code": self.code}
        if self.fields is not None:
            error["fields"] = self.fields
        return {"error": error}


def error_response(error: ApiError):
    g.error_code = error.code  # for the request's log line
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


# Werkzeug's own errors (404, 405, 413, ...), with codes a client can branch on.
HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


def from_http_exception(exc: HTTPException) -> ApiError:
    headers = {}
    if exc.code == 405 and exc.valid_methods:
        headers["Allow"] = ", ".join(exc.valid_methods)
    message = {
        404: "No such route. POST /generate is the endpoint; the interactive docs are at /docs and the OpenAPI "
        "document at /openapi.json.",
        413: f"The request body is larger than MAX_CONTENT_LENGTH ({current_app.config['MAX_CONTENT_LENGTH']} bytes).",
    }.get(exc.code, exc.description)
    return ApiError(exc.code, message, code=HTTP_ERROR_CODES.get(exc.code), headers=headers)


def register_error_handlers(app: Flask) -> None:
    """Every error, ours, Werkzeug's or a bug's, leaves in the one JSON shape, never as HTML or a traceback."""

    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def handle_http_exception(exc: HTTPException):
        return error_response(from_http_exception(exc))

    @app.errorhandler(Exception)
    def handle_unexpected(exc: Exception):
        log.exception("unhandled error on the request path")
        return error_response(ApiError(500, "Internal error; it has been logged.", code="internal_error"))
