"""GET /metrics: Prometheus text for admin keys only, with numbers that add up across gunicorn's workers."""

import json
import re
import urllib.request

import pytest
from prometheus_client import REGISTRY

from genapi import metrics
from tests.conftest import USER_KEY
from tests.procfile import ProcfileService
from tests.test_upstream import timeout

ADMIN_KEY = "test-admin-key-9876543210"


@pytest.fixture
def admin_app(make_app):
    return make_app(admin_api_keys=f"ops:{ADMIN_KEY}")


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_without_a_key_is_401(admin_app):
    assert admin_app.test_client().get("/metrics").status_code == 401


def test_metrics_with_a_user_key_is_403_admin_only(admin_app):
    response = admin_app.test_client().get("/metrics", headers={"X-API-KEY": USER_KEY})
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "admin_only"


def test_metrics_with_an_admin_key_is_prometheus_text(admin_app):
    response = admin_app.test_client().get("/metrics", headers={"X-API-KEY": ADMIN_KEY})
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    text = response.get_data(as_text=True)
    for name in ("genapi_requests_total", "genapi_request_duration_seconds_bucket", "genapi_tokens_total"):
        assert name in text


def test_admin_key_also_works_for_generate(admin_app):
    response = admin_app.test_client().post("/generate", json={"prompt": "hi"}, headers={"X-API-KEY": ADMIN_KEY})
    assert response.status_code == 200


def test_requests_are_counted_by_route_template_method_and_status(client, generate):
    before = sample("genapi_requests_total", route="/generate", method="POST", status="200")
    generate()
    generate()
    assert sample("genapi_requests_total", route="/generate", method="POST", status="200") == before + 2


def test_unknown_paths_share_one_route_label(client):
    before = sample("genapi_requests_total", route=metrics.UNMATCHED_ROUTE, method="GET", status="404")
    client.get("/no/such/path/1")
    client.get("/no/such/path/2")
    assert sample("genapi_requests_total", route=metrics.UNMATCHED_ROUTE, method="GET", status="404") == before + 2


def test_made_up_methods_share_one_method_label(client):
    before = sample("genapi_requests_total", route=metrics.UNMATCHED_ROUTE, method="other", status="405")
    client.open("/healthz", method="RANDOM1")
    client.open("/healthz", method="RANDOM2")
    assert sample("genapi_requests_total", route=metrics.UNMATCHED_ROUTE, method="other", status="405") == before + 2
    made_up = {"route": metrics.UNMATCHED_ROUTE, "method": "RANDOM1", "status": "405"}
    assert REGISTRY.get_sample_value("genapi_requests_total", made_up) is None


def test_tokens_and_upstream_latency_are_counted(generate):
    tokens_in = sample("genapi_tokens_total", direction="in")
    tokens_out = sample("genapi_tokens_total", direction="out")
    completions = sample("genapi_upstream_duration_seconds_count")
    usage = generate().get_json()["usage"]
    assert sample("genapi_tokens_total", direction="in") == tokens_in + usage["prompt_tokens"]
    assert sample("genapi_tokens_total", direction="out") == tokens_out + usage["completion_tokens"]
    assert sample("genapi_upstream_duration_seconds_count") == completions + 1


def test_upstream_errors_are_counted_by_kind(generate, upstream):
    before = sample("genapi_upstream_errors_total", kind="upstream_timeout")
    upstream.then(timeout)
    assert generate().status_code == 504
    assert sample("genapi_upstream_errors_total", kind="upstream_timeout") == before + 1


def test_cache_and_rate_limit_counters_count_what_they_are_told():
    hits = sample("genapi_cache_lookups_total", result="hit")
    misses = sample("genapi_cache_lookups_total", result="miss")
    limited = sample("genapi_rate_limited_total")
    metrics.count_cache_lookup(hit=True)
    metrics.count_cache_lookup(hit=False)
    metrics.count_rate_limited()
    assert sample("genapi_cache_lookups_total", result="hit") == hits + 1
    assert sample("genapi_cache_lookups_total", result="miss") == misses + 1
    assert sample("genapi_rate_limited_total") == limited + 1


@pytest.fixture
def two_worker_service(fake_openai, tmp_path):
    service = ProcfileService(
        {
            "API_KEYS": f"alice:{USER_KEY}",
            "ADMIN_API_KEYS": f"ops:{ADMIN_KEY}",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": fake_openai.base_url,
            "WEB_CONCURRENCY": "2",
        },
        tmp_path / "web.log",
    )
    service.wait_until_healthy()
    yield service
    service.terminate()


def generate_over_a_fresh_connection(url: str) -> None:
    request = urllib.request.Request(
        f"{url}/generate",
        data=json.dumps({"prompt": "count me"}).encode(),
        headers={"Content-Type": "application/json", "X-API-KEY": USER_KEY, "Connection": "close"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def pids_that_served_generate(service: ProcfileService) -> set[int]:
    lines = [json.loads(line) for line in service.output().splitlines() if line.startswith("{")]
    return {line["pid"] for line in lines if line.get("logger") == "genapi.request" and line["path"] == "/generate"}


def test_request_counter_sums_every_workers_requests(two_worker_service):
    sent = 0
    # Until both workers have served some (the kernel picks which accepts), with a bound: at least 20 requests.
    while sent < 20 or len(pids_that_served_generate(two_worker_service)) < 2:
        assert sent < 500, "one worker served every request"
        generate_over_a_fresh_connection(two_worker_service.url)
        sent += 1
    request = urllib.request.Request(f"{two_worker_service.url}/metrics", headers={"X-API-KEY": ADMIN_KEY})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    counted = re.findall(r'^genapi_requests_total\{[^}]*route="/generate"[^}]*status="200"[^}]*\} (\S+)$', text, re.M)
    assert len(pids_that_served_generate(two_worker_service)) == 2
    assert sum(float(value) for value in counted) == sent


def test_start_up_logs_one_configuration_line_without_secrets(two_worker_service):
    two_worker_service.terminate()
    lines = [json.loads(line) for line in two_worker_service.output().splitlines() if line.startswith("{")]
    [start_up] = [line for line in lines if line["message"] == "genapi started"]
    configuration = start_up["configuration"]
    assert configuration["web_concurrency"] == 2
    assert configuration["openai_base_url"] == "127.0.0.1"
    assert configuration["api_keys"] == configuration["admin_api_keys"] == configuration["openai_api_key"] == "***"
    output = two_worker_service.output()
    assert USER_KEY not in output and ADMIN_KEY not in output and "sk-test" not in output
