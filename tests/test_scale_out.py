"""Scaling out, end to end: instances started from the Procfile (gunicorn, gevent workers) sharing
one Redis, in front of the loopback fake OpenAI server."""

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ADMIN_KEY, UPSTREAM_KEY, USER_KEY
from tests.procfile import ProcfileService


@pytest.fixture
def start_instances(fake_openai, tmp_path):
    """Start instances of the Procfile's web line, two workers each; keyword arguments are extra environment."""
    services = []

    def start(count=2, **env):
        environment = {
            "API_KEYS": f"alice:{USER_KEY}",
            "ADMIN_API_KEYS": f"root:{ADMIN_KEY}",
            "OPENAI_API_KEY": UPSTREAM_KEY,
            "OPENAI_BASE_URL": fake_openai.base_url,
            "OPENAI_MODEL": "fake-model",
            "WEB_CONCURRENCY": "2",
        } | {name.upper(): str(value) for name, value in env.items()}
        started = [ProcfileService(environment, tmp_path / f"web{len(services) + n}.log") for n in range(count)]
        services.extend(started)
        for service in started:
            service.wait_until_healthy()
        return started

    yield start
    for service in services:
        service.terminate()


def call(url, path="/generate", body=None, key=USER_KEY, headers=None):
    """(status, headers, JSON body) of one request; errors are answers too."""
    data = json.dumps(body if body is not None else {"prompt": "hi", "max_tokens": 20}).encode()
    headers = {"Content-Type": "application/json", "X-API-KEY": key} | (headers or {})
    request = urllib.request.Request(url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def get(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_burst_of_100_over_two_instances_gets_exactly_20_answers_and_80_429s(start_instances, redis_settings):
    instances = start_instances(rate_limit="20/minute", **redis_settings)
    urls = [instances[n % 2].url for n in range(100)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda url: call(url), urls))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 20
    assert statuses.count(429) == 80
    refused = [(headers, body) for status, headers, body in answers if status == 429]
    assert all(int(headers["Retry-After"]) >= 1 for headers, _ in refused)
    assert all(body["error"]["code"] == "rate_limit_exceeded" for _, body in refused)


def test_a_repeated_request_is_cached_across_instances_and_workers_but_not_across_keys(
    start_instances, redis_settings, fake_openai
):
    first, second = start_instances(cache_ttl=60, **redis_settings)
    assert call(first.url)[2]["cached"] is False
    for url in (second.url, first.url, second.url):
        status, headers, body = call(url)
        assert (status, headers["X-Cache"], body["cached"]) == (200, "HIT", True)
    assert fake_openai.calls == 1
    status, headers, body = call(second.url, key=ADMIN_KEY)
    assert (headers["X-Cache"], body["cached"]) == ("MISS", False)
    assert fake_openai.calls == 2


def test_a_batch_of_8_one_second_prompts_runs_concurrently_on_gevent_workers(start_instances, fake_openai):
    (instance,) = start_instances(count=1)
    fake_openai.delay = 1
    # A 400 is not retried (a 500 would be, by OPENAI_MAX_RETRIES, and take two seconds on its own).
    prompts = [f"prompt {n}" for n in range(7)] + ["prompt 7 FAIL:400"]
    started = time.monotonic()
    status, _, body = call(instance.url, "/generate/batch", {"prompts": prompts})
    elapsed = time.monotonic() - started
    assert status == 200
    assert elapsed < 2.5
    assert fake_openai.max_in_flight == 8
    assert [r.get("response") for r in body["results"][:7]] == [f"echo: prompt {n}" for n in range(7)]
    assert body["results"][7]["error"]["code"] == "upstream_rejected_request"


def test_stopping_redis_mid_load_causes_no_500s_and_readyz_says_what_is_wrong(
    start_instances, private_redis, fake_openai
):
    instances = start_instances(rate_limit="1000/minute", cache_ttl=60, redis_url=private_redis.url)
    assert all(get(instance.url, "/readyz")[0] == 200 for instance in instances)

    def load(n):
        return call(instances[n % 2].url, body={"prompt": f"prompt {n % 7}", "max_tokens": 20})[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        before = list(pool.map(load, range(40)))
        private_redis.stop()
        after = list(pool.map(load, range(40, 120)))
    assert set(before) == {200}
    assert set(after) == {200}
    for instance in instances:
        status, body = get(instance.url, "/readyz")
        assert status == 503
        assert body["error"]["code"] == "redis_unavailable"
    for instance in instances:
        instance.terminate()
        assert private_redis.PASSWORD not in instance.output()
        assert " 500 " not in instance.output()
