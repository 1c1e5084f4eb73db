"""The HTTP service under load: capacity, latency at a fixed rate, and shedding past capacity.

`bidhive bench serve [--quick]` (or `python -m bench.serve_load [--bidders local]`)
starts `bidhive serve --fleet metro` itself (a fresh journal in a temp dir, a free
loopback port), waits until it answers, and drives it with locust FastHttpUsers from
`bench/serve_locustfile.py`, one process per phase, run at `nice -n 19`. The generator
therefore shares neither the service's event loop nor, when the service is busy, its
cores: the service's processes and its Ray workers run at nice 0. Phases:

1. capacity probe, closed loop: U users post back to back; capacity is the rate of
   `200` answers after a warm-up, the best over the concurrency levels tried.
2. open loop (arrivals on a fixed schedule, see the locustfile) at 200 orders/s, at 1x
   and at 2x the measured capacity: latency percentiles of `200` answers, answers by
   status code, and offered against sent and answered rates (a send's lag behind its
   due time shows whether the generator kept the schedule).

After each open-loop phase the bench waits until the service has no open order and
checks the /metrics counters against what the clients saw (received = accepted, ended
= received, shed = `503`s, each up to the requests the generator abandoned at its hard
stop). At 2x it also looks up every accepted order (`200`/`202`) with
`GET /orders/{id}`: a lost order is one not found, or found in no known state.
Each open-loop phase also gives the service's own latency view from its /metrics
histograms (`service_latency`: accepted to answered, and each round's quote and settle
times), beside the clients': the gap between the two is time spent before the service
took the request or after it answered, a starved generator's included.

Every phase also reports where the CPU went: CPU seconds per service role (Serve proxy,
the `ServeReplica` with the desk and the round loop, bidder actors, Ray's daemons),
per accepted order, for the load generator, and what other people's jobs took
meanwhile (the machine's busy time minus ours). On 2 cores that split is the profile
that decides capacity. The idle service's own use is measured first.

The service is then stopped with SIGINT to its process group, and the bench checks
that none of its processes (its whole session: Ray puts workers in groups of their
own), none of its Ray temp files and none of its bidder snapshot dirs are left. The
orders are the peak scenario's, generated for the metro fleet (the 25x fleet: the
service's market clock runs in real time, and the default fleet saturates within
seconds). The service inherits this process's environment (less `RAY_ADDRESS`), so a
Serve setting can be tried without editing anything, e.g.
`RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=0 bidhive bench serve`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.stats import machine
from serve.config import FLEET_DIR_PREFIX
from serve.metrics import LATENCY_BUCKETS_MS
from serve.runner import spare_port

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).with_name("serve_locustfile.py")
HOST = "127.0.0.1"
READY_LINE = "bidhive is serving on"
BODIES = 4000  # distinct order bodies, cycled (the service assigns each order its own id)
TARGETS = {"capacity_orders_per_s": 300.0, "p99_ms_at_200": 100.0}


@dataclass(frozen=True)
class Plan:
    """How long and how hard each phase runs."""

    probe_users: tuple[int, ...] = (64, 256)
    probe_s: float = 20.0
    warmup_s: float = 5.0
    open_s: float = 30.0
    fixed_rate: float = 200.0
    #: open-loop phases: at `fixed_rate`, at 1x and at 2x the measured capacity.
    open_phases: tuple[str, ...] = ("rate_200", "capacity_1x", "capacity_2x")
    #: open-loop users per order/s offered: the seconds a user may be busy with one order
    #: before the schedule slips. The service answers within answer_timeout_s (5 s: then
    #: 202), so a service that keeps its own timeout never makes the schedule slip.
    user_seconds: float = 6.0
    max_users: int = 3000
    idle_s: float = 5.0
    drain_s: float = 30.0


#: Smoke run (under 90 s with a ~30 s service start): short phases, no 1x phase.
QUICK = Plan(probe_users=(128,), probe_s=4.0, warmup_s=1.5, open_s=2.0, open_phases=("rate_200", "capacity_2x"),
             idle_s=1.0, drain_s=10.0)


# -- the service -------------------------------------------------------------------------------
@dataclass
class Service:
    """A `bidhive serve` child in its own process group, and where its output goes."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    command: list[str]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_service(workdir: Path, bidders: str, timeout_s: float = 180.0) -> Service:
    """Starts the service and returns once it prints its ready line and its bidders answer."""
    port = spare_port(HOST)
    args = ["serve", "--fleet", "metro", "--bidders", bidders, "--host", HOST, "--port", str(port),
            "--journal", str(workdir / "journal.bhj")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always its own loopback Ray
    env["PYTHONUNBUFFERED"] = "1"
    log = workdir / "service.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bidhive_cli.main", *args], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    service = Service(proc, port, log, ["bidhive", *args])
    try:
        _wait_ready(service, timeout_s)
    except BaseException:
        stop_service(service)
        raise
    return service


def _wait_ready(service: Service, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while READY_LINE not in service.log.read_text(errors="replace"):
        if service.proc.poll() is not None:
            raise RuntimeError(f"bidhive serve exited ({service.proc.returncode}):\n{_tail(service.log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"bidhive serve not ready in {timeout_s:.0f} s:\n{_tail(service.log)}")
        time.sleep(0.2)
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{service.url}/healthz", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"bidhive serve never healthy:\n{_tail(service.log)}")


def _tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of the service's session: the CLI, its Ray daemons and workers.

    The session, not the process group: Ray puts its workers in process groups of their own.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ray_temp_dirs(pids: list[int]) -> set[str]:
    """The service's Ray temp dirs, read off its daemons' command lines."""
    found: set[str] = set()
    for pid in pids:
        found.update(re.findall(r"--temp[-_]dir=(\S+)", _cmdline(pid)))
    return found


def stop_service(service: Service, timeout_s: float = 90.0) -> dict[str, Any]:
    """SIGINT to the service's process group (as Ctrl-C does), then checks nothing is left.

    Escalates to SIGTERM (the group) and then SIGKILL (every process of its session)
    if it does not stop, and says so: a clean stop is part of what the bench checks.
    """
    sid = service.proc.pid  # started with start_new_session: session id = group id = its pid
    temp_dirs = _ray_temp_dirs(_session_pids(sid))
    started = time.monotonic()
    how = "sigint"
    for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        _signal(sid, sig)
        if _wait_gone(service, wait_s):
            break
        how = {signal.SIGINT: "sigterm", signal.SIGTERM: "sigkill"}.get(sig, "stuck")
    return {"stopped_by": how, "stop_s": round(time.monotonic() - started, 1), "exit_code": service.proc.poll(),
            "processes_left": [_cmdline(p)[:80] for p in _session_pids(sid)],
            "ray_temp_dirs_left": sorted(d for d in temp_dirs if Path(d).exists())}


def _signal(sid: int, sig: signal.Signals) -> None:
    """SIGINT/SIGTERM go to the service's process group; SIGKILL to each process of its session."""
    targets = _session_pids(sid) if sig == signal.SIGKILL else [-sid]
    for target in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, sig)


def _wait_gone(service: Service, wait_s: float) -> bool:
    """Waits for the CLI to exit (reaping it) and for the rest of its session to go."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if service.proc.poll() is not None and not _session_pids(service.proc.pid):
            return True
        time.sleep(0.25)
    return False


# -- where the CPU goes ---------------------------------------------------------------------------
#: Service processes by role, told apart by the title Ray gives its workers.
ROLES = (("ray::ProxyActor", "proxy"), ("ray::ServeReplica", "replica"), ("ray::BidderProcess", "bidders"),
         ("ray::BidderHost", "bidders"), ("ray::ServeController", "controller"))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class CpuMeter:
    """CPU seconds by service role, by the load generator and by the whole machine, over a phase.

    The split is the profile that matters on 2 cores: capacity is about 2 CPU-seconds
    divided by the CPU-milliseconds one order costs across all processes, and the
    machine's busy time minus ours is what other people's jobs took meanwhile.
    """

    sid: int
    start_roles: dict[int, tuple[str, float]] | None = None
    start_children: float = 0.0
    start_machine: float = 0.0
    started: float = 0.0

    def _roles(self) -> dict[int, tuple[str, float]]:
        out = {}
        for pid in _session_pids(self.sid):
            title = _cmdline(pid)
            role = next((name for prefix, name in ROLES if title.startswith(prefix)), "ray_daemons_and_cli")
            out[pid] = (role, _cpu_s(pid))
        return out

    def start(self) -> None:
        """Takes the phase's first reading."""
        self.start_roles, self.started = self._roles(), time.monotonic()
        self.start_children = _children_cpu_s()
        self.start_machine = _machine_busy_s()

    def stop(self, orders: int) -> dict[str, Any]:
        """CPU seconds per role, and CPU ms per accepted order, since `start`."""
        assert self.start_roles is not None
        wall = time.monotonic() - self.started
        used: Counter[str] = Counter()
        for pid, (role, cpu) in self._roles().items():
            used[role] += cpu - self.start_roles.get(pid, (role, 0.0))[1]
        used["load_generator"] = _children_cpu_s() - self.start_children
        machine_busy = _machine_busy_s() - self.start_machine
        ours = sum(used.values())
        per_order = {k: round(1000 * v / orders, 2) for k, v in used.most_common()} if orders else {}
        return {"wall_s": round(wall, 1), "cpu_s": {k: round(v, 2) for k, v in used.most_common()},
                "cpu_ms_per_accepted_order": per_order | {"total": round(1000 * ours / orders, 2)} if orders else {},
                "machine_busy_cores": round(machine_busy / wall, 2),
                "others_busy_cores": round(max(0.0, machine_busy - ours) / wall, 2)}


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished children (the load generator's processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- the service's own view ----------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value} (counters summed over labels under their bare name too)."""
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=30.0).text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as `scrape` returns it."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
        bare = key.split("{", 1)[0]
        if bare != key:
            out[bare] = out.get(bare, 0.0) + float(value)
    return out


def drain(url: str, timeout_s: float) -> float:
    """Waits until no order is open (the phase's last orders ended); returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if httpx.get(f"{url}/healthz", timeout=10.0).json().get("open_orders", 1) == 0:
            break
        time.sleep(0.25)
    return round(time.monotonic() - started, 2)


def _diff(before: dict[str, float], after: dict[str, float], key: str) -> float:
    """How much a /metrics series (its whole key, labels included) grew over the phase."""
    return after.get(key, 0.0) - before.get(key, 0.0)


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> int:
    return int(round(_diff(before, after, f"bidhive_{name}")))


def counter_check(before: dict[str, float], after: dict[str, float], statuses: Counter[int],
                  abandoned: int) -> dict[str, Any]:
    """The phase's /metrics deltas against the clients' answers: they must agree.

    A request the generator abandoned at its hard stop (`abandoned`, taken and not
    answered) may or may not have reached the desk, so each count may exceed what the
    clients saw by at most that many; every order received must have ended. A 503 comes
    either from the desk (counted as shed) or from Serve's bounded queue in front of it
    (never reaches the desk), so the desk's shed count is at most the clients' 503s.
    """
    accepted = statuses[200] + statuses[202]
    seen = {"received": _delta(before, after, "orders_received_total"),
            "ended": _delta(before, after, "orders_ended_total"), "shed": _delta(before, after, "orders_shed_total"),
            "open_after": int(after.get("bidhive_open_orders", -1))}
    agree = (accepted <= seen["received"] <= accepted + abandoned and seen["ended"] == seen["received"]
             and seen["shed"] <= statuses[503] + abandoned and seen["open_after"] == 0)
    return {**seen, "clients_accepted": accepted, "clients_503": statuses[503], "clients_abandoned": abandoned,
            "agree": agree}


def round_facts(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """How the phase's orders were traded: orders per round and bidder calls per order."""
    orders = _delta(before, after, "orders_received_total")
    rounds = _delta(before, after, "rounds_total")
    asked = _delta(before, after, 'bidder_calls_total{outcome="asked"}')
    return {"rounds": rounds, "orders_per_round": round(orders / rounds, 1) if rounds else None,
            "bidder_asks_per_order": round(asked / orders, 2) if orders else None}


def histogram_view(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, Any]:
    """A phase's share of a /metrics latency histogram: count, mean, and the bucket bound each
    of p50, p95 and p99 falls under (None: above the last bound).

    The service's own clock: `order_latency_ms` runs from an order's acceptance to its
    answer being ready. What a client sees on top (the request's wait to be read, the HTTP
    way, a starved load generator's delay in reading the answer) is the gap to the client's
    figures.
    """
    key = f"bidhive_{name}"
    cumulative = [_diff(before, after, f'{key}_bucket{{le="{b:g}"}}') for b in LATENCY_BUCKETS_MS]
    count = _diff(before, after, f"{key}_count")
    out: dict[str, Any] = {"count": int(round(count))}
    if count <= 0:
        return out | {"mean_ms": None, "p50_le_ms": None, "p95_le_ms": None, "p99_le_ms": None}
    out["mean_ms"] = round(_diff(before, after, f"{key}_sum") / count, 1)
    for q in (50, 95, 99):
        out[f"p{q}_le_ms"] = next((b for b, c in zip(LATENCY_BUCKETS_MS, cumulative) if c >= q / 100 * count), None)
    return out


def service_latency(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The service's view of the phase: orders (accepted to answered) and rounds (quote, settle)."""
    return {"order": histogram_view(before, after, "order_latency_ms"),
            "round_quote": histogram_view(before, after, "round_quote_ms"),
            "round_settle": histogram_view(before, after, "round_settle_ms")}


async def _lookup(url: str, ids: list[str], concurrency: int = 32) -> Counter[str]:
    """GET /orders/{id} for each id; counts their statuses ('missing' for a 404)."""
    seen: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        async def one(order_id: str) -> None:
            async with gate:
                resp = await client.get(f"/orders/{order_id}")
            seen["missing" if resp.status_code == 404 else str(resp.json().get("status")) if resp.status_code == 200
                 else f"http_{resp.status_code}"] += 1

        await asyncio.gather(*(one(i) for i in ids))
    return seen


def verify_accepted(url: str, records: list[list[Any]]) -> dict[str, Any]:
    """Every order answered 200/202 must be found, in the state the client was told or later."""
    accepted = {r[5]: r[6] for r in records if r[4] in (200, 202) and r[5]}
    found = asyncio.run(_lookup(url, sorted(accepted)))
    known = found["awarded"] + found["unfulfilled"] + found["pending"]
    return {"accepted": len(accepted), "answers_without_id": sum(1 for r in records if r[4] in (200, 202) and not r[5]),
            "found_by_status": dict(found), "lost": len(accepted) - known}


# -- the load generator --------------------------------------------------------------------------
def run_phase(workdir: Path, url: str, name: str, mode: str, users: int, duration_s: float, rate: float = 0.0,
              drain_s: float = 30.0) -> dict[str, Any]:
    """One locust process (nice 19) for one phase; returns its raw result."""
    spec = {"name": name, "mode": mode, "users": users, "duration_s": duration_s, "rate": rate,
            "max_requests": 10_000_000, "drain_s": drain_s, "host": url, "bodies": str(workdir / "bodies.json"),
            "run_id": uuid.uuid4().hex[:8]}
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    with (workdir / f"{name}.locust.log").open("wb") as log:
        subprocess.run(["nice", "-n", "19", sys.executable, str(LOCUSTFILE), str(spec_path), str(out_path)],
                       cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                       timeout=duration_s + drain_s + 120)
    return json.loads(out_path.read_text())


def _pct(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    if not values:
        return {f"p{q}_ms": None for q in qs} | {"max_ms": None}
    ms = np.asarray(values) * 1000.0
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in qs} | {"max_ms": round(float(ms.max()), 1)}


def _statuses(records: list[list[Any]]) -> Counter[int]:
    return Counter(int(r[4]) for r in records)


def _status_names(statuses: Counter[int]) -> dict[str, int]:
    return {("transport_error" if code == 0 else str(code)): n for code, n in sorted(statuses.items())}


def closed_summary(raw: dict[str, Any], users: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """Closed loop: orders/s of `200` answers ending inside the window after the warm-up."""
    records = raw["records"]
    window = duration_s - warmup_s
    done_200 = [r for r in records if r[4] == 200 and warmup_s <= r[2] + r[3] <= duration_s]
    return {"users": users, "duration_s": duration_s, "warmup_s": warmup_s,
            "orders_per_s": round(len(done_200) / window, 1),
            "latency_200": _pct([r[3] for r in done_200]), "statuses": _status_names(_statuses(records)),
            "awarded_share": _awarded_share(records), "locust": raw["locust"]}


def open_summary(raw: dict[str, Any], rate: float, users: int, duration_s: float) -> dict[str, Any]:
    """Open loop: offered against sent and answered, latency of `200`s, answers by status."""
    records = raw["records"]
    lags = [r[2] - r[1] for r in records]
    in_window = [r for r in records if r[2] + r[3] <= duration_s]
    return {
        "offered_per_s": rate, "users": users, "duration_s": duration_s, "scheduled": raw["slots"],
        "sent": len(records), "not_sent": raw["slots"] - raw["slots_taken"],
        "in_flight_at_stop": raw["in_flight_at_stop"],
        "sent_per_s": round(sum(1 for r in records if r[2] <= duration_s) / duration_s, 1),
        "answered_per_s": round(len(in_window) / duration_s, 1),
        "orders_200_per_s": round(sum(1 for r in in_window if r[4] == 200) / duration_s, 1),
        "send_lag": _pct(lags, (50, 99)) | {"late_10ms_share": round(float(np.mean(np.asarray(lags) > 0.010)), 4)
                                          if lags else None},
        "latency_200": _pct([r[3] for r in records if r[4] == 200]),
        "latency_503": _pct([r[3] for r in records if r[4] == 503], (50, 99)),
        "statuses": _status_names(_statuses(records)), "awarded_share": _awarded_share(records),
        "locust": raw["locust"],
    }


def _awarded_share(records: list[list[Any]]) -> float | None:
    answered = [r for r in records if r[4] == 200]
    return round(sum(1 for r in answered if r[6] == "awarded") / len(answered), 4) if answered else None


# -- the bench -----------------------------------------------------------------------------------
def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared: every figure carries one)."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _accepted(records: list[list[Any]]) -> int:
    return sum(1 for r in records if r[4] in (200, 202))


def capacity_probe(workdir: Path, service: Service, plan: Plan) -> dict[str, Any]:
    """Closed loop at each concurrency level; capacity is the best sustained `200` rate."""
    levels = []
    for users in plan.probe_users:
        before, metrics, meter = loadavg(), scrape(service.url), CpuMeter(service.proc.pid)
        meter.start()
        raw = run_phase(workdir, service.url, f"probe-{users}", "closed", users, plan.probe_s, drain_s=plan.drain_s)
        load = [before, loadavg()]
        drain(service.url, plan.drain_s)
        levels.append(closed_summary(raw, users, plan.probe_s, plan.warmup_s)
                      | {"loadavg": load, "cpu": meter.stop(_accepted(raw["records"])),
                         "rounds": round_facts(metrics, scrape(service.url))})
    best = max(levels, key=lambda lv: lv["orders_per_s"])
    return {"orders_per_s": best["orders_per_s"], "best_users": best["users"], "levels": levels}


def open_phase(workdir: Path, service: Service, plan: Plan, name: str, rate: float, verify: bool) -> dict[str, Any]:
    """One open-loop phase, its drain, its counter check and (at 2x) the lost-order check."""
    users = max(32, min(plan.max_users, math.ceil(rate * plan.user_seconds)))
    before_metrics, before_load, meter = scrape(service.url), loadavg(), CpuMeter(service.proc.pid)
    meter.start()
    raw = run_phase(workdir, service.url, name, "open", users, plan.open_s, rate=rate, drain_s=plan.drain_s)
    load = [before_load, loadavg()]
    drain_s = drain(service.url, plan.drain_s)
    out = open_summary(raw, rate, users, plan.open_s) | {"loadavg": load, "drain_s": drain_s,
                                                          "cpu": meter.stop(_accepted(raw["records"]))}
    after_metrics = scrape(service.url)
    out["metrics_check"] = counter_check(before_metrics, after_metrics, _statuses(raw["records"]),
                                         raw["in_flight_at_stop"])
    out["rounds"] = round_facts(before_metrics, after_metrics)
    out["service_latency"] = service_latency(before_metrics, after_metrics)
    if verify:
        out["lost_check"] = verify_accepted(service.url, raw["records"]) | {"abandoned": raw["in_flight_at_stop"]}
    return out


def _state_root_entries() -> set[str]:
    """Bidder snapshot dirs (`FLEET_DIR_PREFIX*`) now present."""
    from agents.actor import default_state_root

    return {str(p) for p in Path(default_state_root()).glob(f"{FLEET_DIR_PREFIX}*")}


def own_snapshot_dirs(before: set[str]) -> list[str]:
    """The snapshot dir(s) our service made: new since it started, holding metro bidders' snapshots.

    Other engineers' services share the state root, so a new dir alone proves nothing;
    ours hold files named after the metro fleet's agents (written once orders settle).
    """
    from agents.fleet import build_fleet
    from market.config import load_fleet

    metro = {a.agent_id for a in build_fleet(load_fleet("metro")).agents}
    return sorted(d for d in _state_root_entries() - before
                  if (stems := {f.name.split(".")[0] for f in Path(d).glob("*.snap")}) and stems <= metro)


def _still_there(paths: list[str], grace_s: float = 5.0) -> list[str]:
    """The paths that still exist after a grace period (removal may trail the processes' exit)."""
    deadline = time.monotonic() + grace_s
    while any(Path(p).exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.25)
    return [p for p in paths if Path(p).exists()]


def idle_cpu(service: Service, seconds: float) -> dict[str, Any]:
    """Cores the idle service uses, by role: the floor every order's CPU cost sits on."""
    meter = CpuMeter(service.proc.pid)
    meter.start()
    time.sleep(seconds)
    used = meter.stop(0)
    return {"seconds": seconds, "cores": {k: round(v / used["wall_s"], 3) for k, v in used["cpu_s"].items()},
            "others_busy_cores": used["others_busy_cores"]}


def _service_cfg(bidders: str) -> dict[str, Any]:
    """The settings the service ran with (configs/serve.yaml and the bench's overrides)."""
    from serve.config import load_serve_cfg

    cfg, _ = load_serve_cfg(None, fleet="metro", bidders=bidders)
    return cfg.model_dump(mode="json", exclude={"token", "journal"})


def _kept_schedule(phase: dict[str, Any]) -> bool:
    """Whether the generator really offered the phase's rate (sent within 5% of it)."""
    return phase["sent"] > 0 and phase["sent_per_s"] >= 0.95 * phase["offered_per_s"]


def _verdict(capacity: float, phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The targets, each judged only on a phase that really ran at its rate.

    Shedding at 2x means: the excess is refused with 503 (or there is no excess, because
    the service answered all of it), and no answer is an error other than 503.
    """
    at200, at2x = phases["rate_200"], phases["capacity_2x"]
    lost = at2x["lost_check"]
    statuses = at2x["statuses"]
    other_errors = sum(n for code, n in statuses.items() if code not in ("200", "202", "503"))
    kept_up = at2x["answered_per_s"] >= 0.95 * at2x["offered_per_s"]
    return {
        "capacity_ge_300": capacity >= TARGETS["capacity_orders_per_s"],
        "p99_le_100ms_at_200": _kept_schedule(at200)
        and (at200["latency_200"]["p99_ms"] or math.inf) <= TARGETS["p99_ms_at_200"],
        "sheds_with_503_at_2x": _kept_schedule(at2x) and other_errors == 0 and (statuses.get("503", 0) > 0 or kept_up),
        "zero_lost_at_2x": lost["accepted"] > 0 and lost["lost"] == 0,
        "metrics_agree": all(p["metrics_check"]["agree"] for p in phases.values()),
        "schedule_kept": {name: _kept_schedule(p) for name, p in phases.items()},
    }


def run(quick: bool = False, bidders: str = "ray") -> dict[str, Any]:
    """The whole bench: start the service, idle, probe, the open-loop phases, stop; JSON-ready result."""
    from bidhive_cli.demo_cmd import synthetic_bodies

    plan = QUICK if quick else Plan()
    idle_load = loadavg()
    snapshots_before = _state_root_entries()
    workdir = Path(tempfile.mkdtemp(prefix="bidhive-bench-serve-"))
    try:
        (workdir / "bodies.json").write_text(json.dumps(synthetic_bodies(BODIES, fleet="metro", seed=7)))
        started = time.monotonic()
        service = start_service(workdir, bidders)
        ready_s = round(time.monotonic() - started, 1)
        ours: list[str] = []
        try:
            idle = idle_cpu(service, plan.idle_s)
            # The fixed-rate latency phase runs first, on a market the other phases have not
            # filled yet: the service's clock is real time, and ~30,000 orders in 3 minutes use
            # up even the metro fleet, after which most orders take every retry round.
            phases = {"rate_200": open_phase(workdir, service, plan, "rate_200", plan.fixed_rate, verify=False)}
            capacity = capacity_probe(workdir, service, plan)
            ours = own_snapshot_dirs(snapshots_before)
            cap = capacity["orders_per_s"]
            rates = {"capacity_1x": cap, "capacity_2x": 2 * cap}
            phases |= {name: open_phase(workdir, service, plan, name, rates[name], verify=name == "capacity_2x")
                       for name in plan.open_phases if name != "rate_200"}
        finally:
            cleanup = stop_service(service)
        cleanup["snapshot_dirs"] = {"made": ours, "left": _still_there(ours)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "serve", "machine": machine(), "loadavg_before": idle_load, "loadavg_after": loadavg(),
        "config": {"command": " ".join(service.command[:-2] + ["--journal", "TMP/journal.bhj"]),
                   "plan": asdict(plan), "quick": quick, "generator": f"locust {metadata.version('locust')} FastHttpUser, 1 process, nice 19",
                   "orders": "peak scenario, metro fleet, seed 7", "ready_s": ready_s,
                   "service": _service_cfg(bidders)},
        "idle": idle, "capacity_probe": capacity, **phases, "targets": TARGETS, "verdict": _verdict(cap, phases),
        "cleanup": cleanup,
    }


def main() -> None:
    """`python -m bench.serve_load [--quick] [--bidders local]`: prints the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short phases (smoke run, under 90 s)")
    parser.add_argument("--bidders", choices=("ray", "local"), default="ray")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, bidders=args.bidders), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
