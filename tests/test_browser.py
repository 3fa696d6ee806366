"""In a real browser (headless Chromium, driven by Selenium): the /docs page's "Try it out", and CORS from a page
on another origin. Both run against the Procfile's service; they skip where Chromium is not installed, and
GENAPI_REQUIRE_BROWSER=1 (as .ci/run sets) turns that skip into a failure."""

import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import USER_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_SECONDS = 60  # generous, for a busy machine; each wait ends as soon as what it waits for is there


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "Chromium is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("GENAPI_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-dev-shm-usage", "--window-size=1280,2000"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT_SECONDS)
    yield driver
    driver.quit()


class BlankPage(BaseHTTPRequestHandler):
    """Any path: an empty HTML page, the other origin a browser client would live on."""

    def do_GET(self):
        body = b"<!doctype html><title>client page</title><p>a page on another origin</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def page_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BlankPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def start_service(start_procfile_service):
    """The Procfile's service, stopped without waiting out its graceful shutdown: the browser keeps idle
    keep-alive connections open, which gunicorn would otherwise wait for, up to its 25 s graceful_timeout."""
    services = []

    def start(base_url, **env):
        services.append(start_procfile_service(base_url, **env))
        return services[-1]

    yield start
    for service in services:
        service.terminate(wait=2)


def wait(driver):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_SECONDS)


def test_the_docs_page_finds_generate_and_try_it_out_with_a_key_gets_a_200(
    browser, start_service, fake_openai
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown

    service = start_service(fake_openai.base_url)
    browser.get(f"{service.url}/docs")
    operation = wait(browser).until(shown.visibility_of_element_located((By.ID, "operations-default-post_generate")))
    assert "/generate" in operation.text

    browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
    key_field = wait(browser).until(shown.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux input")))
    key_field.send_keys(USER_KEY)
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux button.btn-done").click()

    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait(browser).until(shown.element_to_be_clickable((By.CSS_SELECTOR, "#operations-default-post_generate .try-out__btn"))).click()
    body = wait(browser).until(
        shown.visibility_of_element_located((By.CSS_SELECTOR, "#operations-default-post_generate textarea.body-param__text"))
    )
    body.clear()
    body.send_keys('{"prompt": "Tell me a joke.", "max_tokens": 20}')
    browser.find_element(By.CSS_SELECTOR, "#operations-default-post_generate button.execute").click()
    status = wait(browser).until(
        shown.visibility_of_element_located(
            (By.CSS_SELECTOR, "#operations-default-post_generate .live-responses-table .response .response-col_status")
        )
    )
    assert status.text.strip().startswith("200")
    assert fake_openai.calls == 1  # the model was called, once, by the page


FETCH_GENERATE = """
const [url, key, done] = arguments;
fetch(url + "/generate", {method: "POST", headers: {"Content-Type": "application/json", "X-API-KEY": key},
                          body: JSON.stringify({prompt: "Tell me a joke."})})
  .then(async (response) => done({status: response.status, requestId: response.headers.get("X-Request-ID"),
                                  model: (await response.json()).model}))
  .catch((error) => done({refused: String(error)}));
"""


def test_a_page_on_a_listed_origin_calls_the_service_and_another_origin_is_refused(
    browser, start_service, fake_openai, page_server
):
    listed, unlisted = f"http://127.0.0.1:{page_server}", f"http://localhost:{page_server}"
    service = start_service(fake_openai.base_url, CORS_ORIGINS=listed)

    browser.get(f"{listed}/client")
    answer = browser.execute_async_script(FETCH_GENERATE, service.url, USER_KEY)
    assert answer.get("status") == 200, answer
    assert answer["requestId"] and answer["model"] == "fake-model"

    browser.get(f"{unlisted}/client")  # the same page on another origin: localhost is not 127.0.0.1 to a browser
    answer = browser.execute_async_script(FETCH_GENERATE, service.url, USER_KEY)
    assert "refused" in answer, answer
