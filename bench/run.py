"""genapi's benchmark: the Procfile's service against the fake upstream, loaded by wrk, in one run.

    .venv/bin/python bench/run.py            # the full run, about 2 minutes; prints the table for docs/benchmark.md
    .venv/bin/python bench/run.py --quick    # every scenario for ~2 s with fewer clients; CI's smoke, asserts no speed

With PostgreSQL reachable (BENCH_POSTGRES_URL, default the local one), it runs the service again on a database of
its own, with a key from the database and the usage ledger writing there, for the rows named "PostgreSQL".

It starts tests/fake_openai.py as its own process, then the service exactly as the Procfile does (same command, PORT
set, default configuration), drives POST /generate with wrk, and reads the CPU time and memory of the service's
processes (the gunicorn master and its workers) from /proc before and after each scenario. The instant-upstream
scenarios run the same wrk against the fake upstream directly, in the same run, so their ratios hold on a noisy
machine. docs/benchmark.md explains the numbers.
"""

import argparse
import datetime
import json
import math
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.reference import TARGET_MACHINE_BARE_FLASK_RPS, TARGET_MACHINE_SDK_CALL_CPU_MS, sdk_call_cpu_ms  # noqa: E402
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


FULL = Plan()
QUICK = Plan(slow_clients=(20, 50), busy_clients=8, seconds=2, instant_seconds=2, warmup_seconds=1, upstream_delay=0.2)


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


def cpu_seconds(root: int) -> float:
    """User plus system time of a process tree, in seconds."""
    total = 0
    for pid in tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / CLOCK_TICKS


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


def wait_for_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


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
        wait_for_port(port)
        wait_until_answers(port, "/v1/chat/completions", DIRECT_BODY)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self._log.close()


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
        rows.append(Row("memory after the runs (all processes)", rss_mb=rss, versus=f"PSS sum {pss:.0f} MB (RSS sum {rss:.0f})",
                        target=verdict(pss < 150)))  # fmt: skip
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


def load_bare_flask(clients: int, seconds: float, workdir: Path) -> dict:
    """wrk against bench/reference.py's one-line route, served with the Procfile service's worker class and count."""
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "bench" / "reference_gunicorn.py"),
               "--bind", f"127.0.0.1:{port}", "bench.reference:app"]  # fmt: skip
    with open(workdir / "reference.log", "wb") as log:
        server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port)
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
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (Debian/Ubuntu)")
    # 500 clients need 500 sockets in wrk and ~1000 in the service; the limit is inherited by every process started here.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    workdir = ROOT / "bench" / "results"
    workdir.mkdir(exist_ok=True)
    header = f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {machine()}"
    plan = QUICK if args.quick else FULL
    rows = run(plan, workdir)
    rows += run_with_postgres(plan, workdir, rows)
    if args.quick:  # a smoke: the targets are for the full run's sizes and lengths
        for r in rows:
            r.target = ""
    print(f"\ngenapi benchmark{' (--quick: a smoke, not a measurement)' if args.quick else ''}: {header}\n")
    print(table(rows))
    result = {"when": header, "quick": args.quick, "rows": [r.__dict__ for r in rows]}
    (workdir / ("quick.json" if args.quick else "latest.json")).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
