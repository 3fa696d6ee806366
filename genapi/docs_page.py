"""GET /docs: the interactive docs page (Swagger UI, on /openapi.json), from the files flask-swagger-ui installs.

GET / redirects there. The page is for people, not part of the API: its routes are left out of the OpenAPI
document (and so out of the fuzzer's reach); PAGE_ROUTES says which they are.
"""

from flask import Flask, redirect
from flask_swagger_ui import get_swaggerui_blueprint

from genapi.limits import exempt

DOCS_URL = "/docs"
# The routes of the page: the redirect, the page itself, and the files it loads (Swagger UI's script and styles).
PAGE_ROUTES = {"/", f"{DOCS_URL}/", f"{DOCS_URL}/<path:path>"}


def register_docs_page(app: Flask) -> None:
    """Serve Swagger UI at /docs/ (with /docs and / redirecting to it), never rate limited, with no key."""
    page = get_swaggerui_blueprint(
        DOCS_URL,
        "/openapi.json",
        # The page's "Try it out" sends the X-API-KEY that "Authorize" was given; keep it across a reload.
        config={"app_name": "genapi", "persistAuthorization": True, "displayRequestDuration": True},
        blueprint_name="docs",
    )
    exempt(page)
    app.register_blueprint(page)
    app.add_url_rule("/", view_func=exempt(front_page), methods=["GET"])


def front_page():
    """GET /: the docs page."""
    return redirect(f"{DOCS_URL}/")
