"""End to end over real sockets: the app against the loopback fake OpenAI server, and the Procfile's web line."""

import json
import socket
import urllib.error
import urllib.request

import pytest

from tests.conftest import UPSTREAM_KEY, USER_KEY, make_settings
from tests.fake_openai import DROP, EMPTY_CHOICES, HANG, NOT_JSON, Status
from tests.procfile import ProcfileService, free_port

from app import create_app


@pytest.fixture
def e2e_client(fake_openai):
    """The app (Flask's test client) calling the fake server through the real SDK and real sockets."""

    def build(**overrides):
        settings = make_settings(openai_base_url=fake_openai.base_url, **overrides)
        return create_app(settings).test_client()

    return build


def post(client, **body):
    return client.post("/generate", json={"prompt": "Tell me a joke."} | body, headers={"X-API-KEY": USER_KEY})


def test_generate_returns_the_upstream_text_model_usage_and_finish_reason(e2e_client, fake_openai):
    response = post(e2e_client(), max_tokens=50)
    assert response.status_code == 200
    body = response.get_json()
    assert body["response"] == "echo: Tell me a joke."
    assert body["model"] == "test-model"
    assert body["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_upstream_gets_bearer_upstream_key_and_no_client_key(e2e_client, fake_openai):
    post(e2e_client())
    headers = fake_openai.requests[0]["headers"]
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert USER_KEY not in json.dumps(headers)


@pytest.mark.parametrize(
    "behaviour, status",
    [(DROP, 502), (NOT_JSON, 502), (EMPTY_CHOICES, 502), (Status(500), 502), (Status(429), 503), (Status(400), 400)],
    ids=["dropped", "not-json", "empty-choices", "500", "429", "400"],
)
def test_upstream_failure_over_sockets_maps_to_its_status_then_recovers(e2e_client, fake_openai, behaviour, status):
    client = e2e_client()
    fake_openai.then(behaviour)
    assert post(client).status_code == status
    assert post(client).status_code == 200


def test_upstream_that_never_answers_is_504(e2e_client, fake_openai):
    client = e2e_client(openai_timeout=0.5)
    fake_openai.then(HANG)
    response = post(client)
    assert response.status_code == 504
    assert post(client).status_code == 200


def test_upstream_refusing_connections_is_502(make_app):
    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
        client = create_app(make_settings(openai_base_url=base_url)).test_client()
        response = post(client)
    assert response.status_code == 502
    assert response.get_json()["error"]["code"] == "upstream_unavailable"


def test_one_retry_calls_a_failing_upstream_exactly_twice_over_sockets(e2e_client, fake_openai):
    client = e2e_client(openai_max_retries=1)
    fake_openai.then(Status(500), Status(500), Status(500))
    assert post(client).status_code == 502
    assert fake_openai.calls == 2


@pytest.fixture
def procfile_service(fake_openai, start_procfile_service):
    return start_procfile_service(fake_openai.base_url)


def http(method, url, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_procfile_web_line_serves_on_port_with_the_upstream(procfile_service, fake_openai):
    status, body = http(
        "POST",
        f"{procfile_service.url}/generate",
        {"prompt": "Tell me a joke.", "max_tokens": 50},
        {"Content-Type": "application/json", "X-API-KEY": USER_KEY},
    )
    assert status == 200
    assert body["response"] == "echo: Tell me a joke."
    assert body["model"] == "fake-model"


def test_procfile_service_answers_errors_as_json(procfile_service):
    status, body = http("POST", f"{procfile_service.url}/generate", {"prompt": "x"}, {"Content-Type": "application/json"})
    assert status == 401
    assert body["error"]["code"] == "missing_api_key"
    status, body = http("GET", f"{procfile_service.url}/nowhere")
    assert status == 404
    assert "error" in body


def test_procfile_service_logs_hold_no_key(fake_openai, start_procfile_service):
    procfile_service = start_procfile_service(fake_openai.base_url, ACCESS_LOG="true")
    headers = {"Content-Type": "application/json", "X-API-KEY": USER_KEY}
    http("POST", f"{procfile_service.url}/generate", {"prompt": "hi"}, headers)
    fake_openai.then(Status(401, f"bad key {UPSTREAM_KEY}"))
    http("POST", f"{procfile_service.url}/generate", {"prompt": "hi"}, headers)
    procfile_service.terminate()
    output = procfile_service.output()
    assert "POST /generate" in output
    assert USER_KEY not in output
    assert UPSTREAM_KEY not in output


def test_procfile_refuses_to_start_with_a_wrong_setting(tmp_path):
    service = ProcfileService({"API_KEYS": "k", "OPENAI_TIMEOUT": "soon"}, tmp_path / "web.log", port=free_port())
    assert service.process.wait(60) != 0
    assert "OPENAI_TIMEOUT" in service.output()


def test_procfile_service_output_has_no_logging_error_or_traceback(procfile_service):
    headers = {"Content-Type": "application/json", "X-API-KEY": USER_KEY}
    http("POST", f"{procfile_service.url}/generate", {"prompt": "hi"}, headers)
    procfile_service.terminate()
    output = procfile_service.output()
    assert "Booting worker" in output and "Shutting down" in output
    assert "Traceback" not in output
    assert "Logging error" not in output
