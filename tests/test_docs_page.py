"""GET /docs: the interactive docs page on /openapi.json, served from installed files; / leads there."""

import re


def test_root_redirects_to_the_docs_page(client):
    response = client.get("/")
    assert response.status_code == 302
    assert response.headers["Location"] == "/docs/"


def test_docs_redirects_to_its_page_with_a_slash(client):
    response = client.get("/docs")
    assert response.status_code in (301, 308)
    assert response.headers["Location"].endswith("/docs/")


def test_docs_page_is_swagger_ui_on_the_openapi_document_with_no_key(client):
    page = client.get("/docs/")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert '"url": "/openapi.json"' in html
    assert "/docs/swagger-ui-bundle.js" in html


def test_docs_page_loads_its_script_from_this_server_not_a_cdn(client):
    html = client.get("/docs/").get_data(as_text=True)
    assert set(re.findall(r"https?://[^/\"']+", html)) <= {"http://localhost"}  # the test client's own host
    script = client.get("/docs/swagger-ui-bundle.js")
    assert script.status_code == 200
    assert "SwaggerUIBundle" in script.get_data(as_text=True)


def test_an_unknown_file_under_docs_is_the_json_404(client):
    response = client.get("/docs/no-such-file.js")
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_a_path_outside_the_docs_files_is_refused(client):
    assert client.get("/docs/../app.py").status_code == 404


def test_the_404_hint_names_the_docs_page_and_the_openapi_document(client):
    message = client.get("/nowhere").get_json()["error"]["message"]
    assert "/docs" in message and "/openapi.json" in message


def test_the_docs_page_is_never_rate_limited_nor_needs_a_key(make_app):
    client = make_app(auth_failure_limit="1/minute").test_client()
    client.post("/generate", json={"prompt": "x"})  # one failed authentication uses up this address's limit
    assert client.post("/generate", json={"prompt": "x"}).status_code == 429
    assert client.get("/docs/").status_code == 200
