"""genapi's benchmark: the Procfile's service against the fake upstream, loaded by wrk, in one run.

    .venv-bench/bin/python bench/run.py      # the full run, about 12 minutes; prints the tables for docs/benchmark*.md
    .venv/bin/python bench/run.py --quick    # every scenario for ~2 s with fewer clients; CI's smoke, asserts no speed

The service runs from this Python's environment; for a measurement, one with only what a deploy installs
(docs/benchmark.md: `.venv-bench`).

With PostgreSQL reachable (BENCH_POSTGRES_URL, default the local one), it runs the service again on a database of
its own, with a key from the database and the usage ledger writing there, for the rows named "PostgreSQL".

It starts tests/fake_openai.py as its own process, then the service exactly as the Procfile does (same command, PORT
set, default configuration), drives POST /generate with wrk, and reads the CPU time and memory of the service's
processes (the gunicorn master and its workers) from /proc before and after each scenario. The instant-upstream
scenarios run the same wrk against the fake upstream directly, in the same run, so their ratios hold on a noisy
machine. docs/benchmark.md explains the numbers.

The streaming scenarios (docs/benchmark-streaming.md) run a service of their own against bench/stream_upstream.py,
paced or silent, loaded by bench/stream_load.js (Node.js), which times every event of every stream.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reference import (  # noqa: E402
    TARGET_MACHINE_BARE_FLASK_RPS,
    TARGET_MACHINE_SDK_CALL_CPU_MS,
    sdk_call_cpu_ms,
    sdk_stream_chunk_cpu_ms,
)
from tests.procfile import ProcfileService, free_port  # noqa: E402

API_KEY = "bench-key-0123456789"
PROMPT = "Tell me a joke about benchmarks."
SERVICE_BODY = json.dumps({"prompt": PROMPT, "max_tokens": 50})
DIRECT_BODY = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 50})
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Plan:
    """How long and how wide each scenario runs."""

    slow_clients: tuple[int, ...] = (200, 500)
    busy_clients: int = 32
    seconds: int = 20
    instant_seconds: int = 10
    warmup_seconds: int = 2
    upstream_delay: float = 1.0
    # Streams: each of 50 chunks, one every 50 ms (20 tokens/s), from bench/stream_upstream.py.
    stream_clients: int = 200
    stream_seconds: int = 20
    stream_chunks: int = 50
    stream_interval: float = 0.05
    sdk_streams: int = 200  # the SDK's streaming reference: this many streams, sdk_concurrency at a time
    sdk_concurrency: int = 50
    silent_clients: int = 1000
    silent_hold_seconds: int = 30
    heartbeat_seconds: float = 5.0


FULL = Plan()
QUICK = Plan(slow_clients=(20, 50), busy_clients=8, seconds=2, instant_seconds=2, warmup_seconds=1, upstream_delay=0.2,
             stream_clients=20, stream_seconds=2, sdk_streams=10, sdk_concurrency=10, silent_clients=50,
             silent_hold_seconds=3, heartbeat_seconds=1.0)  # fmt: skip


@dataclass
class Row:
    scenario: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int | None = None
    cpu_ms_per_request: float | None = None
    rss_mb: float | None = None
    versus: str = ""
    target: str = ""
    extra: dict = field(default_factory=dict)


# -- processes -----------------------------------------------------------------------------------------------------
def tree_pids(root: int) -> list[int]:
    """The process and all its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(parents.get(pid, []))
    return pids


def cpu_seconds(root: int, workers_only: bool = False) -> float:
    """User plus system time of a process tree (or of the root's descendants only), in seconds."""
    total = 0
    for pid in tree_pids(root)[1 if workers_only else 0 :]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLOCK_TICKS


def machine_cpu_seconds() -> float:
    """CPU time all cores spent busy since boot (/proc/stat: every state but idle and iowait), in seconds."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def memory_mb(root: int) -> tuple[float, float]:
    """(RSS summed, PSS summed) of a process tree in MB; PSS splits the pages the workers share with the master."""
    rss = pss = 0
    for pid in tree_pids(root):
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            pss += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1)) * 1024
        except (OSError, AttributeError):
            continue
    return rss / 2**20, pss / 2**20


# What a deploy installs: the service's requirements and the optional C parser (docs/speedups.md).
RUNTIME_REQUIREMENTS = ("requirements.txt", "requirements-speedups.txt")
REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def packages_beyond_runtime() -> list[str]:
    """The installed distributions a deploy would not have: all but what RUNTIME_REQUIREMENTS pull in.

    They are not inert: a library imports an optional package when it finds it installed (httpcore2 imports trio,
    which selenium brings), so the service's memory is measured against its target only without them. Markers other
    than extras are not evaluated, which can only let a package through, never flag one wrongly.
    """
    installed = {normalized(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    seen: set[tuple[str, frozenset]] = set()
    todo = []
    for name in RUNTIME_REQUIREMENTS:
        for line in (ROOT / name).read_text().splitlines():
            match = REQUIREMENT_NAME.match(line.split("#", 1)[0])
            if match and not line.lstrip().startswith("-"):
                todo.append((match.group(1), match.group(2) or ""))
    while todo:
        name, extras = todo.pop()
        key = normalized(name)
        requested = {normalized(extra) for extra in extras.split(",") if extra.strip()}
        if (key, frozenset(requested)) in seen or key not in installed:
            continue
        seen.add((key, frozenset(requested)))
        for requirement in installed[key].requires or []:
            requirement_name, _, marker = requirement.partition(";")
            extra = EXTRA_MARKER.search(marker)
            if extra and normalized(extra.group(1)) not in requested:
                continue
            match = REQUIREMENT_NAME.match(requirement_name)
            todo.append((match.group(1), match.group(2) or ""))
    needed = {key for key, _ in seen} | {"pip", "setuptools", "wheel"}
    return sorted(installed[key].metadata["Name"] for key in installed.keys() - needed)


def wait_for_200(url: str, seconds: float = 10, body: bytes | None = None) -> None:
    """Until a GET (a POST, with a body) answers 200: an open port alone does not say the server is ready to answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, data=body, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{url} did not answer 200 within {seconds:g} s")


def wait_until_answers(port: int, path: str, body: str, api_key: str = "", seconds: float = 120) -> None:
    """Until a real request gets a 200: on a busy machine a port that accepts connections may not answer for seconds."""
    headers = {"Content-Type": "application/json"} | ({"X-API-KEY": api_key} if api_key else {})
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body.encode(), headers=headers)
    deadline, problem = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                if response.status == 200:
                    return
        except OSError as error:  # refused, timed out, or an HTTP error status
            problem = error
        time.sleep(0.1)
    raise SystemExit(f"127.0.0.1:{port}{path} did not answer 200 within {seconds:g} s: {problem}")


def share_of(part: float, whole: float) -> str:
    """`part` as a percentage of `whole`, or a plain word when `whole` is zero (no answers to compare with)."""
    return f"{part / whole:.1%}" if whole else "n/a (nothing answered)"


class FakeUpstream:
    """tests/fake_openai.py in its own process, on a fixed port, so the service can outlive a restart of it."""

    def __init__(self, port: int, delay: float, log_path: Path):
        self.port, self.delay = port, delay
        self._log = open(log_path, "ab")
        command = [sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", str(port), "--delay", str(delay)]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until_answers(port, "/v1/chat/completions", DIRECT_BODY)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


class StreamUpstream(FakeUpstream):
    """bench/stream_upstream.py in its own process: paced OpenAI streams, or silent ones."""

    def __init__(self, port: int, chunks: int, interval: float, log_path: Path):
        self.port = port
        self._log = open(log_path, "ab")
        command = [sys.executable, str(ROOT / "bench" / "stream_upstream.py"), "--port", str(port),
                   "--chunks", str(chunks), "--interval", str(interval)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for_200(f"http://127.0.0.1:{port}/healthz")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as response:
            return json.loads(response.read())


# -- load ----------------------------------------------------------------------------------------------------------
def wrk(port: int, path: str, body: str, clients: int, seconds: float, stagger: float = 0.0, api_key: str = "",
        ramp: float = 0.0) -> dict:
    """One wrk run, each connection's first request after a random 0..stagger s; its numbers (bench/post.lua).

    With a ramp, the load lasts ramp + seconds (and one more second, so that answers due by the end arrive), and
    `window_rps` counts the answers completed in the `seconds` after the ramp: the steady rate, without the first
    round trips, when no answer can come back yet.
    """
    threads = min(clients, os.cpu_count() or 2)
    window_start = time.monotonic() + ramp if ramp else 0.0
    window = (window_start, window_start + seconds) if ramp else (0.0, 0.0)
    duration = math.ceil(ramp + seconds + 1) if ramp else round(seconds)
    command = [
        "wrk", f"-t{threads}", f"-c{clients}", f"-d{duration}s", "--timeout", "10s",
        "-s", str(ROOT / "bench" / "post.lua"), f"http://127.0.0.1:{port}",
        "--", path, body, str(round(stagger * 1000)), str(-(-clients // threads)), api_key or "-",
        f"{window[0]:.6f}", f"{window[1]:.6f}",
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((ln for ln in finished.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if finished.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({finished.returncode}):\n{finished.stdout}\n{finished.stderr}")
    numbers = json.loads(line.removeprefix("BENCH "))
    numbers["rps"] = numbers["requests"] / numbers["seconds"] if numbers["seconds"] else 0.0
    numbers["window_rps"] = numbers["in_window"] / seconds if ramp else None
    numbers["errors"] = numbers["non_2xx"] + numbers["socket_errors"]
    return numbers


def load_service(service: ProcfileService, clients: int, seconds: float, stagger: float = 0.0, ramp: float = 0.0,
                 api_key: str = API_KEY) -> dict:
    """wrk against POST /generate, with the service's CPU time per answered request."""
    pid = service.process.pid
    cpu_before = cpu_seconds(pid)
    numbers = wrk(service.port, "/generate", SERVICE_BODY, clients, seconds, stagger, api_key, ramp)
    numbers["cpu_ms_per_request"] = (cpu_seconds(pid) - cpu_before) * 1000 / max(1, numbers["requests"])
    numbers["rss_mb"], numbers["pss_mb"] = memory_mb(pid)
    return numbers


def load_direct(upstream: FakeUpstream, clients: int, seconds: float) -> dict:
    return wrk(upstream.port, "/v1/chat/completions", DIRECT_BODY, clients, seconds)


def stream_load(port: int, path: str, body: dict, stream_format: str, clients: int, seconds: float = 0,
                stagger: float = 0, hold: float = 0, headers: dict | None = None, while_all_open=None) -> dict:
    """One run of bench/stream_load.js: `clients` streams at a time, each event timestamped; its numbers.

    With `hold`, every client opens one stream and hangs up `hold` seconds after its headers came; `while_all_open`
    is called about once a second from the moment every stream is open until the client ends (to sample memory).
    """
    load_plan = {"port": port, "path": path, "body": json.dumps(body), "clients": clients, "format": stream_format,
                 "seconds": seconds, "stagger_ms": round(stagger * 1000), "hold_seconds": hold,
                 "stream_timeout_seconds": 60, "headers": headers or {}}  # fmt: skip
    bound = stagger + seconds + hold + 60 + 30
    process = subprocess.Popen(["node", str(ROOT / "bench" / "stream_load.js"), json.dumps(load_plan)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: list[str] = []
    all_open = threading.Event()

    def read_lines():
        for line in process.stdout:
            lines.append(line)
            if line.startswith("ALL_OPEN"):
                all_open.set()

    reader = threading.Thread(target=read_lines, daemon=True)
    reader.start()
    deadline = time.monotonic() + bound
    while process.poll() is None and time.monotonic() < deadline:
        if while_all_open and all_open.is_set():
            while_all_open()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(1)
    if process.poll() is None:
        process.kill()
    process.wait()
    reader.join(5)
    line = next((ln for ln in lines if ln.startswith("BENCH ")), None)
    if process.returncode != 0 or line is None:
        raise SystemExit(f"bench/stream_load.js failed ({process.returncode}):\n{''.join(lines)}")
    return json.loads(line.removeprefix("BENCH "))


# -- scenarios -----------------------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def times(slowdown: float) -> str:
    """How a machine that takes `slowdown` times as long as the targets' machine compares with it, in words."""
    return f"{slowdown:.2f}x slower than" if slowdown >= 1 else f"{1 / slowdown:.2f}x faster than"


def verdicts(value: float, limit: float, speed: float) -> str:
    """The verdict on a CPU-bound target, and, on a slower machine than the targets', on the target scaled to it."""
    plain = verdict(value <= limit)
    return plain if speed <= 1 else f"{plain} {limit:g} ms; {verdict(value <= limit * speed)} {limit * speed:.2f} ms scaled"


def run(plan: Plan, workdir: Path) -> list[Row]:
    upstream_port = free_port()
    upstream = FakeUpstream(upstream_port, plan.upstream_delay, workdir / "upstream.log")
    (workdir / "bench.sqlite3").unlink(missing_ok=True)
    env = {
        "API_KEYS": f"bench:{API_KEY}",
        "DATABASE_URL": f"sqlite:///{workdir / 'bench.sqlite3'}",  # the default kind, in the results folder
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        # One key sends every request here: the rate limiter still runs on each, but must not refuse them.
        "RATE_LIMIT": "1000000/second",
    }
    launched = time.monotonic()
    service = ProcfileService(env, workdir / "service.log")
    rows: list[Row] = []
    try:
        service.wait_until_healthy(seconds=120)
        startup = time.monotonic() - launched
        wait_until_answers(service.port, "/generate", SERVICE_BODY, API_KEY)
        rows.append(Row("start-up: launch to first 200 on /healthz", versus=f"{startup:.2f} s", target=verdict(startup < 3)))

        # Warm up the workers and open the upstream connections, then measure; the clients are spread over one
        # upstream period (bench/post.lua says why), and the window leaves out the ramp: the stagger, then the
        # first answers.
        load_service(service, plan.slow_clients[0], plan.warmup_seconds)
        for clients, (share, p99_limit) in zip(plan.slow_clients, ((0.97, 1200), (0.95, None))):
            upstream_cpu = cpu_seconds(upstream.process.pid)
            numbers = load_service(service, clients, plan.seconds, stagger=plan.upstream_delay, ramp=2 * plan.upstream_delay)
            ideal = clients / plan.upstream_delay
            ok = numbers["window_rps"] >= share * ideal and numbers["errors"] == 0
            ok = ok and (p99_limit is None or numbers["p99_ms"] <= p99_limit)
            numbers["upstream_cpu_share"] = (cpu_seconds(upstream.process.pid) - upstream_cpu) / plan.seconds
            rows.append(row(f"{clients} clients, upstream {plan.upstream_delay:g} s, {plan.seconds:g} s", numbers,
                            f"{share_of(numbers['window_rps'], ideal)} of ideal {ideal:g}/s (wrk's rate over the whole run,"
                            f" ramp included: {share_of(numbers['rps'], ideal)})", verdict(ok), rps=numbers["window_rps"]))  # fmt: skip

        upstream.stop()  # the same port, now answering at once; the service keeps running
        upstream = FakeUpstream(upstream_port, 0.0, workdir / "upstream.log")
        load_service(service, plan.busy_clients, plan.warmup_seconds)

        # The machine's speed by the reference, one SDK call's CPU, measured right before and right after
        # the scenarios it scales: a shared machine's speed drifts from minute to minute.
        sdk_calls = 200 if plan is QUICK else 2000
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        sdk_ms = [sdk_call_cpu_ms(upstream_url, sdk_calls)]
        measured = []
        for clients in (plan.busy_clients, 1):
            direct = load_direct(upstream, clients, plan.instant_seconds)
            numbers = load_service(service, clients, plan.instant_seconds)
            measured.append((clients, direct, numbers))
        sdk_ms.append(sdk_call_cpu_ms(upstream_url, sdk_calls))
        speed = sum(sdk_ms) / len(sdk_ms) / TARGET_MACHINE_SDK_CALL_CPU_MS  # how many times slower than the targets' machine
        bare = load_bare_flask(plan.busy_clients, plan.instant_seconds, workdir)

        for clients, direct, numbers in measured:
            name = f"{clients} client{'s' if clients > 1 else ''}, upstream instant, {plan.instant_seconds:g} s"
            rows.append(row(f"{name}: direct to upstream", direct))
            if clients == 1:
                added = numbers["p50_ms"] - direct["p50_ms"]
                versus, target = f"+{added:.2f} ms p50 over direct", verdicts(added, 1.5, speed)
            else:
                versus, target = f"{share_of(numbers['rps'], direct['rps'])} of direct", verdicts(numbers["cpu_ms_per_request"], 1.5, speed)
            rows.append(row(f"{name}: through genapi", numbers, versus, target if numbers["errors"] == 0 else "MISSES: errors"))

        rows.append(Row("reference: one SDK chat call, CPU in-process (before, after)", cpu_ms_per_request=speed * TARGET_MACHINE_SDK_CALL_CPU_MS,
                        versus=f"{sdk_ms[0]:.2f} and {sdk_ms[1]:.2f} ms: {speed:.2f}x the targets' machine's {TARGET_MACHINE_SDK_CALL_CPU_MS:g} ms"))  # fmt: skip
        rows.append(budget_row(speed, 2000 if plan is QUICK else 20000))
        rows.append(row(f"reference: bare Flask route, same gunicorn, {plan.busy_clients} clients", bare,
                        f"{times(TARGET_MACHINE_BARE_FLASK_RPS / bare['rps']) if bare['rps'] else 'nothing answered, unlike'} "
                        f"the targets' machine's {TARGET_MACHINE_BARE_FLASK_RPS:,}/s"))  # fmt: skip

        # RSS counts the pages a worker shares with the master once per process; PSS splits them, so the PSS sum is
        # what the service's processes hold in memory together.
        rss, pss = memory_mb(service.process.pid)
        extras = packages_beyond_runtime()
        versus = f"PSS sum {pss:.0f} MB (RSS sum {rss:.0f})"
        if extras:  # the target is for what a deploy runs
            versus += f"; beside {len(extras)} installed packages that a deploy lacks"
        rows.append(Row("memory after the runs (all processes)", rss_mb=rss, versus=versus,
                        target="n/a: not a deploy's environment (docs/benchmark.md)" if extras else verdict(pss < 150)))  # fmt: skip
    finally:
        service.terminate()
        upstream.stop()
    return rows


BENCH_POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def run_with_postgres(plan: Plan, workdir: Path, baseline: list[Row]) -> list[Row]:
    """The same service on PostgreSQL: its key read from the database (cached), every request in the ledger.

    Compared with the rows above, whose key is in API_KEYS and whose ledger is a SQLite file.
    """
    import uuid

    import psycopg

    try:
        admin = psycopg.connect(BENCH_POSTGRES_URL, autocommit=True, connect_timeout=2)
    except psycopg.Error as error:
        return [Row(f"PostgreSQL: not reachable at {BENCH_POSTGRES_URL} ({type(error).__name__}), skipped")]
    name = f"genapi_bench_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    database = BENCH_POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    upstream_port = free_port()
    upstream = FakeUpstream(upstream_port, plan.upstream_delay, workdir / "upstream-pg.log")
    env = {
        "DATABASE_URL": database,
        "ADMIN_API_KEYS": f"bench-admin:{API_KEY}-admin",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "RATE_LIMIT": "1000000/second",
    }
    rows: list[Row] = []
    service = None
    try:
        environment = {"PATH": os.environ["PATH"], "DATABASE_URL": database}
        flask = str(Path(sys.executable).parent / "flask")
        subprocess.run([flask, "--app", "app", "db", "upgrade"], cwd=ROOT, env=environment, check=True, capture_output=True)
        created = subprocess.run([flask, "--app", "app", "keys", "create", "bench-db"], cwd=ROOT, env=environment,
                                 check=True, capture_output=True, text=True)  # fmt: skip
        key = json.loads(created.stdout)["key"]
        service = ProcfileService(env, workdir / "service-pg.log")
        service.wait_until_healthy()
        clients = plan.slow_clients[-1]
        load_service(service, plan.slow_clients[0], plan.warmup_seconds, api_key=key)
        numbers = load_service(service, clients, plan.seconds, stagger=plan.upstream_delay, ramp=2 * plan.upstream_delay,
                               api_key=key)  # fmt: skip
        ideal = clients / plan.upstream_delay
        ok = numbers["window_rps"] >= 0.95 * ideal and numbers["errors"] == 0
        rows.append(row(f"PostgreSQL: {clients} clients, upstream {plan.upstream_delay:g} s, {plan.seconds:g} s", numbers,
                        f"{numbers['window_rps'] / ideal:.1%} of ideal {ideal:g}/s", verdict(ok), rps=numbers["window_rps"]))  # fmt: skip
        upstream.stop()
        upstream = FakeUpstream(upstream_port, 0.0, workdir / "upstream-pg.log")
        load_service(service, plan.busy_clients, plan.warmup_seconds, api_key=key)
        numbers = load_service(service, plan.busy_clients, plan.instant_seconds, api_key=key)
        without = next((r for r in baseline if r.scenario.startswith(f"{plan.busy_clients} clients, upstream instant")
                        and r.scenario.endswith("through genapi")), None)  # fmt: skip
        versus, target = "", ""
        if without and without.cpu_ms_per_request:
            change = numbers["cpu_ms_per_request"] / without.cpu_ms_per_request - 1
            versus = f"CPU {change:+.1%} vs the same row without PostgreSQL ({without.cpu_ms_per_request:.2f} ms)"
            target = verdict(change <= 0.10 and numbers["errors"] == 0)
        rows.append(row(f"PostgreSQL: {plan.busy_clients} clients, upstream instant, {plan.instant_seconds:g} s: keys "
                        "from the database, ledger on", numbers, versus, target))  # fmt: skip
        with psycopg.connect(database, connect_timeout=2) as connection:
            written = connection.execute("SELECT count(*) FROM usage").fetchone()[0]
        rows.append(Row("PostgreSQL: ledger rows written while running", versus=f"{written} rows"))
    finally:
        if service:
            service.terminate()
        upstream.stop()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
    return rows


def budget_cpu_ms(calls: int) -> tuple[float, str]:
    """CPU time in this process of one token budget's reserve and settle (genapi.budgets), and where it counted.

    In Redis (two Lua script round trips) when one answers at BENCH_REDIS_URL, else in the process's own store.
    """
    import redis
    from flask import Flask

    from genapi.budgets import Budgets
    from genapi.keys import Client
    from genapi.redis_state import RedisState
    from config import Settings

    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"genapi-bench-{os.getpid()}:"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
        redis_state = RedisState(url, prefix)
    except redis.RedisError:
        redis_state = None
    budgets = Budgets(Settings(_env_file=None, llm_provider="mock", token_budget="1000000000/month"), redis_state)
    client = Client("bench")
    with Flask(__name__).app_context():
        for _ in range(calls // 10):  # warm: the connection, the scripts loaded into Redis
            budgets.reserve(client, 150).settle(121)
        started = time.process_time()
        for _ in range(calls):
            budgets.reserve(client, 150).settle(121)
        cpu_ms = (time.process_time() - started) * 1000 / calls
    if redis_state:
        keys = list(redis_state.client.scan_iter(match=f"{prefix}*"))
        if keys:
            redis_state.client.delete(*keys)
    return cpu_ms, "Redis" if redis_state else "this process"


def budget_row(speed: float, calls: int) -> Row:
    """What a token budget adds to a request's CPU, reserve and settle, beside the SDK call it is scaled by."""
    cpu_ms, store = budget_cpu_ms(calls)
    return Row(f"token budget: reserve + settle, CPU in-process, counted in {store}", cpu_ms_per_request=cpu_ms,
               versus=f"{cpu_ms / speed:.3f} ms on the targets' machine", target=verdicts(cpu_ms, 0.3, speed))


# -- streaming scenarios -------------------------------------------------------------------------------------------
SILENT_PROMPT = f"{PROMPT} [silent]"  # bench/stream_upstream.py answers it with headers, then nothing
DIRECT_STREAM_BODY = json.loads(DIRECT_BODY) | {"stream": True, "stream_options": {"include_usage": True}}
# The two streaming routes, as a client sends to each: the format of their events, their body, their key.
STREAM_ROUTES = {
    "/generate": ("genapi", json.loads(SERVICE_BODY) | {"stream": True}, {"X-API-KEY": API_KEY}),
    "/v1/chat/completions": ("openai", DIRECT_STREAM_BODY, {"Authorization": f"Bearer {API_KEY}"}),
}


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def added(through: float | None, direct: float | None) -> float | None:
    return None if through is None or direct is None else through - direct


def at_most(value: float | None, limit: float) -> bool:
    return value is not None and value <= limit


def run_streaming(plan: Plan, workdir: Path) -> list[Row]:
    """The streaming scenarios: a service of their own, against bench/stream_upstream.py, and that upstream directly."""
    upstream = StreamUpstream(free_port(), plan.stream_chunks, plan.stream_interval, workdir / "stream_upstream.log")
    env = {
        "API_KEYS": f"bench:{API_KEY}",
        "OPENAI_API_KEY": "sk-bench",
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_MODEL": "fake-model",
        "RATE_LIMIT": "1000000/second",
        "WEB_CONCURRENCY": "2",
        # Short, so that every client of the silent scenario gets several in its hold.
        "STREAM_HEARTBEAT_SECONDS": f"{plan.heartbeat_seconds:g}",
    }
    service = ProcfileService(env, workdir / "stream_service.log")
    rows: list[Row] = []
    try:
        service.wait_until_healthy()
        for route, (stream_format, body, headers) in STREAM_ROUTES.items():  # warm: each worker, each route
            stream_load(service.port, route, body, stream_format, 4, seconds=0.1, headers=headers)
        rows.append(silent_streams(plan, service, upstream))
        rows.extend(relayed_streams(plan, service, upstream))
    finally:
        service.terminate()
        upstream.stop()
    return rows


def silent_streams(plan: Plan, service: ProcfileService, upstream: StreamUpstream) -> Row:
    """Many streams held open while the model says nothing: heartbeats only, and the memory they cost."""
    pid = service.process.pid
    idle_rss, idle_pss = memory_mb(pid)
    held = {"samples": 0, "rss": 0.0, "pss": 0.0, "fds": 0, "fds_by_process": []}

    def sample():
        rss, pss = memory_mb(pid)
        fds = []  # the master's, then each worker's: how the streams spread over the workers
        for process in tree_pids(pid):
            with contextlib.suppress(OSError):
                fds.append(len(os.listdir(f"/proc/{process}/fd")))
        held.update(samples=held["samples"] + 1, rss=max(held["rss"], rss), pss=max(held["pss"], pss))
        if sum(fds) > held["fds"]:
            held.update(fds=sum(fds), fds_by_process=fds)

    _, body, headers = STREAM_ROUTES["/generate"]
    numbers = stream_load(service.port, "/generate", body | {"prompt": SILENT_PROMPT}, "genapi", plan.silent_clients,
                          stagger=min(2.0, plan.silent_hold_seconds / 4), hold=plan.silent_hold_seconds,
                          headers=headers, while_all_open=sample)  # fmt: skip
    # The clients have hung up: each stream must close its upstream connection at its next heartbeat at the latest.
    left = time.monotonic()
    while upstream.stats()["silent_open"] and time.monotonic() - left < 2 * plan.heartbeat_seconds + 5:
        time.sleep(0.2)
    still_open, closed_after = upstream.stats()["silent_open"], time.monotonic() - left

    if still_open:
        closing = f"{still_open} of the model server's silent streams still open {closed_after:.1f} s after the clients left"
    else:
        closing = f"the model server's silent streams all closed {closed_after:.1f} s after the clients left"
    clients = plan.silent_clients
    expected = max(1, math.floor(plan.silent_hold_seconds / plan.heartbeat_seconds) - 1)
    growth = held["pss"] - idle_pss if held["samples"] else None
    problems = []
    if numbers["errors"] or numbers["cut"] or numbers["held"] != clients:
        problems.append(f"{numbers['held']} of {clients} held to the end, {numbers['errors']} errors, {numbers['cut']} cut")
    if numbers["heartbeats_min"] is None or numbers["heartbeats_min"] < expected:
        problems.append(f"a client got {numbers['heartbeats_min']} heartbeats")
    if growth is None:
        problems.append("memory not sampled: the streams were never all open at once")
    elif growth > 100:
        problems.append(f"memory +{growth:.0f} MB")
    memory = "n/a" if growth is None else f"PSS sum {idle_pss:.0f} MB idle, {held['pss']:.0f} MB holding them (+{growth:.0f})"
    if numbers["error_samples"]:
        problems.append(f"first error: {numbers['error_samples'][0][:120]}")
    versus = (f"{numbers['held']}/{clients} held; heartbeats per client {numbers['heartbeats_min']} to "
              f"{numbers['heartbeats_max']} (at least {expected} expected); {memory}; {held['fds']} fds open in the "
              f"service (master, workers: {', '.join(map(str, held['fds_by_process']))}); {closing}")  # fmt: skip
    numbers.update(idle_pss_mb=idle_pss, idle_rss_mb=idle_rss, held_pss_mb=held["pss"], held_fds=held["fds_by_process"],
                   upstream_still_open=still_open)  # fmt: skip
    name = f"{clients:,} streams, silent upstream, heartbeat every {plan.heartbeat_seconds:g} s, held {plan.silent_hold_seconds} s"
    return Row(name, errors=numbers["errors"] + numbers["cut"], rss_mb=held["rss"] or None, versus=versus,
               target="MISSES: " + "; ".join(problems) if problems else "meets", extra=numbers)  # fmt: skip


def relayed_streams(plan: Plan, service: ProcfileService, upstream: StreamUpstream) -> list[Row]:
    """Streams at the model's pace, directly and through each route; the workers' CPU per relayed chunk."""
    pid = service.process.pid
    clients, seconds = plan.stream_clients, plan.stream_seconds
    stagger = min(seconds, plan.stream_chunks * plan.stream_interval)  # over one stream's length: no lock-step
    shape = f"{clients} streams of {plan.stream_chunks} chunks at {1 / plan.stream_interval:g}/s, {seconds} s"
    sdk_before = sdk_stream_chunk_cpu_ms(upstream.url, plan.sdk_streams, plan.sdk_concurrency)
    direct = stream_load(upstream.port, "/v1/chat/completions", DIRECT_STREAM_BODY, "openai", clients, seconds, stagger)
    relayed = {}
    for route, (stream_format, body, headers) in STREAM_ROUTES.items():
        cpu_before, chunks_before = cpu_seconds(pid, workers_only=True), upstream.stats()["chunks_sent"]
        ours_before, machine_before = cpu_seconds(pid) + cpu_seconds(upstream.process.pid), machine_cpu_seconds()
        began = time.monotonic()
        numbers = stream_load(service.port, route, body, stream_format, clients, seconds, stagger, headers=headers)
        wall = time.monotonic() - began
        numbers["worker_cpu_seconds"] = cpu_seconds(pid, workers_only=True) - cpu_before
        numbers["chunks_relayed"] = upstream.stats()["chunks_sent"] - chunks_before
        # How busy the machine was, and how much of that was not this benchmark: on a shared machine, latency
        # grows with what everything else runs.
        ours = cpu_seconds(pid) + cpu_seconds(upstream.process.pid) - ours_before + numbers["client_cpu_seconds"]
        busy = machine_cpu_seconds() - machine_before
        numbers["machine_busy_cores"] = busy / wall
        numbers["others_busy_cores"] = max(0.0, busy - ours) / wall
        numbers["rss_mb"], numbers["pss_mb"] = memory_mb(pid)
        relayed[route] = numbers
    sdk_after = sdk_stream_chunk_cpu_ms(upstream.url, plan.sdk_streams, plan.sdk_concurrency)
    sdk_chunk_ms = (sdk_before[0] + sdk_after[0]) / 2

    rows = [stream_row(f"{shape}: direct to upstream", direct, f"gap p99 {ms(direct['gap_ms']['p99'])}")]
    for route, numbers in relayed.items():
        first_token = added(numbers["first_token_ms"]["p99"], direct["first_token_ms"]["p99"])
        gap = added(numbers["gap_ms"]["p99"], direct["gap_ms"]["p99"])
        problems = []
        if not at_most(first_token, 50):
            problems.append("first token")
        if not at_most(gap, 25):
            problems.append("gap")
        if numbers["errors"] or numbers["cut"] or numbers["complete"] != numbers["streams"] or not numbers["streams"]:
            problems.append("errors or incomplete streams")
        busy = f"{numbers['machine_busy_cores']:.2f} of {os.cpu_count()} cores busy, {numbers['others_busy_cores']:.2f} by other programs"
        rows.append(stream_row(f"{shape}: through genapi {route}", numbers,
                               f"first token p99 {signed(first_token)}, gap p99 {signed(gap)} over direct; {busy}",
                               "MISSES: " + ", ".join(problems) if problems else "meets"))  # fmt: skip
    for route, numbers in relayed.items():
        chunks, cpu = numbers["chunks_relayed"], numbers["worker_cpu_seconds"]
        per_chunk = cpu * 1000 / chunks if chunks else None
        ratio = per_chunk / sdk_chunk_ms if per_chunk is not None and sdk_chunk_ms > 0 else None
        if ratio is None:
            versus, target = f"n/a: {chunks} chunks relayed, SDK {sdk_chunk_ms:.3f} ms per chunk", "MISSES: nothing to divide"
        else:
            versus = (f"{per_chunk:.3f} ms per chunk = {ratio:.2f}x the SDK's {sdk_chunk_ms:.3f} ms "
                      f"({cpu:.2f} s of CPU for {chunks:,} chunks)")  # fmt: skip
            target = verdict(ratio <= 0.6)
        rows.append(Row(f"CPU per relayed chunk, genapi's workers, {route}", cpu_ms_per_request=per_chunk,
                        rss_mb=numbers["rss_mb"], versus=versus, target=target, extra=numbers))  # fmt: skip
    rows.append(Row("reference: the SDK consuming streams in-process, CPU per chunk (before, after)", cpu_ms_per_request=sdk_chunk_ms,
                    versus=f"{sdk_before[0]:.3f} and {sdk_after[0]:.3f} ms; {plan.sdk_streams} streams, "
                           f"{plan.sdk_concurrency} at a time in threads, {sdk_before[1]:,} chunks each time"))  # fmt: skip
    return rows


def signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} ms"


def stream_row(scenario: str, numbers: dict, versus: str, target: str = "") -> Row:
    """A row of streams: completed streams per second, time to first token p50 and p99, errors and cut streams."""
    complete = f"{numbers['complete']}/{numbers['streams']} complete, {numbers['cut']} cut"
    if numbers["error_samples"]:
        complete += f"; first error: {numbers['error_samples'][0][:120]}"
    return Row(scenario, numbers["complete"] / numbers["seconds"] if numbers["seconds"] else None,
               numbers["first_token_ms"]["p50"], numbers["first_token_ms"]["p99"], numbers["errors"] + numbers["cut"],
               rss_mb=numbers.get("rss_mb"), versus=f"{versus}; {complete}", target=target, extra=numbers)  # fmt: skip


def load_bare_flask(clients: int, seconds: float, workdir: Path) -> dict:
    """wrk against bench/reference.py's one-line route, served with the Procfile service's worker class and count."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "bench" / "reference_gunicorn.py"),
               "--bind", f"127.0.0.1:{port}", "bench.reference:app"]  # fmt: skip
    with open(workdir / "reference.log", "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_answers(port, "/", "{}")
            wrk(port, "/", "{}", clients, 1)  # warm up
            return wrk(port, "/", "{}", clients, seconds)
        finally:
            server.terminate()
            server.wait(30)


def row(scenario: str, numbers: dict, versus: str = "", target: str = "", rps: float | None = None) -> Row:
    return Row(
        scenario, numbers["rps"] if rps is None else rps, numbers["p50_ms"], numbers["p99_ms"], numbers["errors"],
        numbers.get("cpu_ms_per_request"), numbers.get("rss_mb"), versus, target, numbers,
    )  # fmt: skip


def table(rows: list[Row]) -> str:
    def show(value, digits=1):
        return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [
        "| scenario | req/s | p50 ms | p99 ms | errors | CPU ms/req | RSS MB | vs ideal or direct | target |",
        "|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in rows:
        cells = [r.scenario, show(r.rps), show(r.p50_ms), show(r.p99_ms), show(r.errors), show(r.cpu_ms_per_request, 2),
                 show(r.rss_mb, 0), r.versus, r.target]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
        "unknown CPU",
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}; load average before the run {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every scenario for ~2 s with fewer clients (CI's smoke)")
    parser.add_argument("--streaming-only", action="store_true", help="only the streaming scenarios (their reference included)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (Debian/Ubuntu)")
    if shutil.which("node") is None:
        raise SystemExit("Node.js is not installed; the streaming scenarios' client is bench/stream_load.js")
    # 1,000 held streams need 1,000 sockets in the client, ~2,000 in the service (each stream's client and upstream
    # connections) and 1,000 in the upstream; the limit is inherited by every process started here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 4 * plan.silent_clients + 1000
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise SystemExit(f"the open-files limit is {hard}; the streaming scenarios need {needed} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    workdir = ROOT / "bench" / "results"
    workdir.mkdir(exist_ok=True)
    header = f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {machine()}"
    rows = [] if args.streaming_only else run(plan, workdir)
    rows += [] if args.streaming_only else run_with_postgres(plan, workdir, rows)
    rows += run_streaming(plan, workdir)
    if args.quick:  # a smoke: the targets are for the full run's sizes and lengths
        for r in rows:
            r.target = ""
    print(f"\ngenapi benchmark{' (--quick: a smoke, not a measurement)' if args.quick else ''}: {header}\n")
    print(table(rows))
    result = {"when": header, "quick": args.quick, "rows": [r.__dict__ for r in rows]}
    (workdir / ("quick.json" if args.quick else "latest.json")).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
