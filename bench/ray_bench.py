"""The Ray runtime against the in-process engine: round latency and orders/s.

`bidhive bench ray` starts a loopback-only Ray (runtime.local_ray) and one pool of 50
bidder actors (one process per resource, `num_cpus=0`, snapshots on), reused for every
case by rebuilding the agents in place. For each fleet size N (10, 30, 50; synthetic
fleets, `bench/fleets.py`) and round size B (1, 16, 64, 256) it runs the same orders
through the auctioneer core twice: over the Ray actors (`RayBidders`, pipelined: a
round's settles ride on the next call; up to K queued rounds share one call per
bidder; F=2 calls in flight, so the auctioneer clears one call's rounds while the
bidders quote the next; bidders that cannot reach any order of the round are not
asked) and over the same agents in-process (`LocalBidders`, one round after another). Orders come from the
peak scenario's evening (their own timestamps drive the market clock) and are all
queued at the start, so orders/s is saturation throughput; each order takes part in
one round (no retries). A round's latency is from its broadcast until its winners'
commits are acknowledged. `single_order` is the latency of a lone order on an idle
auctioneer (one round of one order, commits flushed at once).

Two transport experiments compare the same broadcast (B=64 quotes, releases riding
along, no clearing): classic actor calls against a Ray Compiled Graph (`ray.dag`,
`experimental_compile`) and against async actors. A third (`round_transport`; alone:
`python -m bench.ray_bench --round-transport`) compares how the rounds travel: Ray calls
with the rounds put once in the object store, Ray calls with them pickled once and
carried inside every call, or those bytes over the bidders' channels (the runtime's way,
`runtime.channel`).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import numpy as np

from agents.actor import BidderHost, Settle, default_state_root, fleet_specs
from agents.fleet import build_fleet
from bench.fleets import synthetic_fleet
from bench.stats import machine
from market.auctioneer import AuctioneerCore, BatchPolicy, OrdersClock
from market.config import FleetCfg, load_profile, load_scenario
from market.demand import generate_orders
from market.engine import LocalBidders, MarketEngine
from market.round import build_round
from market.types import Order
from policies.registry import make_policy

FLEETS = (10, 30, 50)
BATCHES = (1, 16, 64, 256)
SEED = 1
DEADLINE_S = 2.0  # generous: the bench measures speed, not faults (timeouts are counted)
#: Holds live in market time. A queued backlog replays minutes of evening orders per
#: second of wall time, so with two calls in flight a round's commit can reach its
#: bidder after the next call moved the bidder's clock past a 5 s TTL. Real-time
#: operation keeps market and wall time together; the bench just lets holds live longer.
HOLD_TTL_S = 3600.0
EVENING_S = 18 * 3600.0


def pipeline(batch: int) -> tuple[int, int]:
    """(K, F): queued rounds that may share one call per bidder (256-512 orders per call), and
    calls in flight (2: the auctioneer clears one call's rounds while bidders quote the next)."""
    return {1: (1, 1), 16: (16, 2), 64: (8, 2), 256: (2, 2)}.get(batch, (1, 1))


def evening_orders(cfg: FleetCfg, n: int, seed: int = 3) -> list[Order]:
    """n consecutive peak-day orders from 18:00 on, with their own timestamps."""
    fleet = build_fleet(cfg, SEED)
    day = generate_orders(load_scenario("peak"), cfg, fleet.env.catalogue, 30_000, seed)
    start = next(i for i, o in enumerate(day) if o.created_s >= EVENING_S)
    picked = day[start:start + n]
    if len(picked) < n:  # more than the evening holds: repeat it, later
        picked = [dataclasses.replace(o, order_id=f"{o.order_id}-{k}") for k in range(n // len(picked) + 1)
                  for o in picked][:n]
    return picked


def _core(bidders: Any, fleet: Any, batch: int, k: int, in_flight: int = 1) -> AuctioneerCore:
    policy = make_policy("heuristic")
    engine = MarketEngine(fleet, policy, load_profile("balanced"), bidders, seed=SEED, exact_every=0,
                          hold_ttl_s=HOLD_TTL_S)
    batching = BatchPolicy(window_s=0.0, max_batch=batch, max_rounds_per_call=k, in_flight=in_flight, max_attempts=1)
    return AuctioneerCore(engine, batching, market=OrdersClock(follow_wall=False))


def _summary(core: AuctioneerCore, n: int, wall_s: float) -> dict[str, Any]:
    lat = np.array([r.latency_s for r in core.records]) * 1000.0
    return {"orders_per_s": round(n / wall_s, 1), "round_p50_ms": round(float(np.percentile(lat, 50)), 2),
            "round_p99_ms": round(float(np.percentile(lat, 99)), 2), "rounds": len(lat),
            "awarded": core.ledger.counts().get("awarded", 0)}


def in_process_case(cfg: FleetCfg, batch: int, orders: list[Order]) -> dict[str, Any]:
    """The same orders through the same core with the agents in this process."""
    fleet = build_fleet(cfg, SEED)
    policy = make_policy("heuristic")
    core = _core(LocalBidders(fleet.agents, policy.strategy), fleet, batch, 1)
    t = time.perf_counter()
    core.submit(orders)
    assert core.run_until_idle(600)
    return _summary(core, len(orders), time.perf_counter() - t)


def _reset(handles: dict[str, Any], cfg: FleetCfg) -> dict[str, Any]:
    """Rebuilds the first len(fleet) actors as this fleet's agents; returns them by agent id."""
    import ray

    specs = fleet_specs(cfg, SEED, "heuristic")
    pool = list(handles.values())[: len(specs)]
    ray.get([h.reset.remote(s) for s, h in zip(specs, pool)])
    return {s.agent_id: h for s, h in zip(specs, pool)}


def ray_case(handles: dict[str, Any], cfg: FleetCfg, batch: int, orders: list[Order], k: int,
             in_flight: int) -> dict[str, Any]:
    """The orders through the core over Ray bidders (pipelined, prefiltered)."""
    from runtime.ray_bidders import RayBidders

    fleet = build_fleet(cfg, SEED)
    rb = RayBidders(fleet, _reset(handles, cfg), deadline_s=DEADLINE_S, prefilter=True)
    core = _core(rb, fleet, batch, k, in_flight)
    t = time.perf_counter()
    core.submit(orders)
    assert core.run_until_idle(600)
    out = _summary(core, len(orders), time.perf_counter() - t)
    facts = list(rb.facts)
    asked = [f.asked for f in facts if f.asked] or [0]
    out.update(rounds_per_call=k, in_flight=in_flight, asked_mean=round(float(np.mean(asked)), 1),
               close_p50_ms=round(float(np.median([f.close_ms for f in facts])), 2),
               slowest_bidder_p50_ms=round(float(np.median([f.busy_ms for f in facts])), 2),
               timed_out=rb.totals["timed_out"], failed=rb.totals["failed"])
    return out


def single_order(handles: dict[str, Any], cfg: FleetCfg, n: int) -> dict[str, Any]:
    """A lone order on an idle auctioneer, n times: quote broadcast, clear, commit acks."""
    from runtime.ray_bidders import RayBidders

    fleet = build_fleet(cfg, SEED)
    core = _core(RayBidders(fleet, _reset(handles, cfg), deadline_s=DEADLINE_S, prefilter=True), fleet, 1, 1)
    for o in evening_orders(cfg, n):
        core.submit([o])
        assert core.run_until_idle(60)
    lat = np.array([r.latency_s for r in core.records]) * 1000.0
    return {"bidders": len(fleet.agents), "orders": n, "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2)}


# -- transport experiments ------------------------------------------------------------------------
def _wire_rounds(cfg: FleetCfg, n_rounds: int, batch: int) -> list[Any]:
    from runtime.ray_bidders import wire_round

    fleet = build_fleet(cfg, SEED)
    orders = evening_orders(cfg, n_rounds * batch)
    idx = fleet.env.catalogue.index
    return [wire_round(build_round(r + 1, orders[(r + 1) * batch - 1].created_s, orders[r * batch:(r + 1) * batch],
                                   fleet.sources, fleet.env.grid, idx)) for r in range(n_rounds)]


def _releases(ids: list[str], rnd: Any) -> dict[str, list[Settle]]:
    return {i: [Settle(rnd.round_id, None, rnd.opened_s)] for i in ids}


def classic_broadcast(bidders: dict[str, Any], rounds: list[Any]) -> list[float]:
    """Round trips of one classic call per bidder (each round put once), releasing the last round."""
    import ray

    lat, prev = [], None
    for rnd in rounds:
        t = time.perf_counter()
        ref = ray.put(rnd)
        rel = [Settle(prev.round_id, None, prev.opened_s)] if prev else []
        ray.get([h.exchange.remote(rel, rnd.opened_s, 5.0, ref) for h in bidders.values()])
        lat.append(time.perf_counter() - t)
        prev = rnd
    return lat


def _cpu_s(pids: set[int]) -> float:
    """User + system CPU seconds of these processes (gone ones count 0)."""
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def round_transport(handles: dict[str, Any], pids: set[int], n_bidders: int = 25, batch: int = 12,
                    rounds_per_block: int = 60, blocks: int = 3) -> dict[str, Any]:
    """How a broadcast's rounds reach the bidders, alternating blocks in one run:
    - `object_store`: Ray calls, the rounds put once (`ray.put`), every call gets the reference;
    - `inline`: Ray calls, the rounds pickled once and carried inside every call (`pack_rounds`);
    - `channel`: the same bytes over each bidder's channel (`runtime.channel`, the runtime's way).
    Reports wall ms and the CPU ms of every process of the cluster and of this driver per
    broadcast (releases ride along)."""
    import ray

    from runtime import channel
    from runtime.ray_bidders import pack_rounds, pickle_rounds

    cfg = synthetic_fleet(n_bidders)
    rounds = _wire_rounds(cfg, rounds_per_block, batch)
    bidders = _reset(handles, cfg)
    node = ray.get_runtime_context().get_node_id()
    endpoints = ray.get([h.open_channel.remote(node) for h in bidders.values()])
    channels = [channel.Channel.connect(e, aid) for aid, e in zip(bidders, endpoints)]

    def over_ray(pack: Any) -> Any:
        return lambda rel, rnd: ray.get([h.exchange_rounds.remote(rel, rnd.opened_s, HOLD_TTL_S, pack([rnd]))
                                         for h in bidders.values()])

    def over_channels(rel: list[Settle], rnd: Any) -> None:
        blob = pickle_rounds([rnd])
        refs = [ch.exchange_rounds.remote(rel, rnd.opened_s, HOLD_TTL_S, blob) for ch in channels]
        for ref in refs:
            channel.get(ref, timeout=30)

    broadcasts = {"object_store": over_ray(ray.put), "inline": over_ray(pack_rounds), "channel": over_channels}
    wall: dict[str, list[float]] = {k: [] for k in broadcasts}
    cpu: dict[str, float] = {k: 0.0 for k in broadcasts}
    everyone = pids | {os.getpid()}
    for _ in range(blocks):
        for name, broadcast in broadcasts.items():
            before, prev = _cpu_s(everyone), None
            for rnd in rounds:
                t = time.perf_counter()
                broadcast([Settle(prev.round_id, None, prev.opened_s)] if prev else [], rnd)
                wall[name].append(time.perf_counter() - t)
                prev = rnd
            cpu[name] += _cpu_s(everyone) - before
    for ch in channels:
        ch.close()
    n = rounds_per_block * blocks
    out = {name: {**_ms(wall[name]), "cpu_ms_per_broadcast": round(cpu[name] / n * 1000, 2)} for name in broadcasts}
    return {"bidders": n_bidders, "batch": batch, "broadcasts_each": n, **out,
            "cpu_ratio_inline_to_object_store": round(cpu["inline"] / cpu["object_store"], 3),
            "cpu_ratio_channel_to_inline": round(cpu["channel"] / cpu["inline"], 3)}


def compiled_broadcast(bidders: dict[str, Any], rounds: list[Any], first_timeout_s: float) -> dict[str, Any]:
    """The same broadcast as a compiled graph: one input (round + everybody's settles), N outputs."""
    import ray
    from ray.dag import InputNode, MultiOutputNode
    from ray.dag.context import DAGContext

    ctx = DAGContext.get_current()  # the first execution sets up every channel: slow on 2 cores
    ctx.get_timeout = ctx.submit_timeout = max(ctx.get_timeout, int(first_timeout_s))
    with InputNode() as inp:
        dag = MultiOutputNode([h.exchange_shared.bind(inp) for h in bidders.values()])
    t = time.perf_counter()
    cdag = dag.experimental_compile()
    out: dict[str, Any] = {"bidders": len(bidders), "compile_s": round(time.perf_counter() - t, 2)}
    ids = list(bidders)
    try:
        t = time.perf_counter()
        ray.get(cdag.execute(({}, rounds[0].opened_s, 5.0, [rounds[0]])), timeout=first_timeout_s)
        out["first_execution_s"] = round(time.perf_counter() - t, 2)
        lat = []
        for prev, rnd in zip(rounds, rounds[1:]):
            t = time.perf_counter()
            ray.get(cdag.execute((_releases(ids, prev), rnd.opened_s, 5.0, [rnd])), timeout=30)
            lat.append(time.perf_counter() - t)
        out.update(p50_ms=round(float(np.median(lat)) * 1000, 2), p99_ms=round(float(np.percentile(lat, 99)) * 1000, 2))
    except Exception as err:  # noqa: BLE001 - RayChannelTimeoutError / GetTimeoutError: record it
        out["error"] = f"{type(err).__name__} after {time.perf_counter() - t:.1f} s"
    finally:
        t = time.perf_counter()
        cdag.teardown()
        out["teardown_s"] = round(time.perf_counter() - t, 2)
    return out


class AsyncBidderHost(BidderHost):
    """The bidder with an async entry point: Ray then runs it as an async actor."""

    async def exchange_async(self, settles: list[Settle], now: float, hold_ttl_s: float, *rounds: Any) -> Any:
        """`exchange` from the actor's event loop."""
        return self.exchange(settles, now, hold_ttl_s, *rounds)


def async_broadcast(cfg: FleetCfg, rounds: list[Any], state_dir: str) -> list[float]:
    """The classic broadcast against async actors (new processes for this fleet)."""
    import ray

    cls = ray.remote(num_cpus=0, max_restarts=0)(AsyncBidderHost)
    actors = [cls.remote(s, state_dir) for s in fleet_specs(cfg, SEED, "heuristic")]
    ray.get([a.ping.remote() for a in actors])
    lat, prev = [], None
    try:
        for rnd in rounds:
            t = time.perf_counter()
            ref = ray.put(rnd)
            rel = [Settle(prev.round_id, None, prev.opened_s)] if prev else []
            ray.get([a.exchange_async.remote(rel, rnd.opened_s, 5.0, ref) for a in actors])
            lat.append(time.perf_counter() - t)
            prev = rnd
    finally:
        for a in actors:
            ray.kill(a)
    return lat


def _ms(lat: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.median(lat)) * 1000, 2), "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 2)}


def transport(handles: dict[str, Any], state_dir: str, quick: bool) -> dict[str, Any]:
    """Classic vs compiled graph (10 and 25 bidders) vs async actors (10), B=64, quotes only."""
    out: dict[str, Any] = {"batch": 64}
    for n in (10,) if quick else (10, 25):
        cfg = synthetic_fleet(n)
        rounds = _wire_rounds(cfg, 12 if quick else 30, 64)
        bidders = _reset(handles, cfg)
        out[f"classic_{n}"] = _ms(classic_broadcast(bidders, rounds))
        _reset(handles, cfg)
        out[f"compiled_graph_{n}"] = compiled_broadcast(bidders, rounds, first_timeout_s=30.0 if n <= 10 else 25.0)
    cfg = synthetic_fleet(10)
    out["async_10"] = _ms(async_broadcast(cfg, _wire_rounds(cfg, 12 if quick else 30, 64), state_dir))
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """The grid (N x B, Ray beside in-process), single-order latency, and the transport comparison."""
    import ray  # noqa: F401 - fail early and clearly if Ray is missing

    from runtime.local_ray import local_ray
    from runtime.ray_bidders import RAY_BIDDER_ENV, spawn_bidders

    fleets = (10,) if quick else FLEETS
    batches = (1, 64) if quick else BATCHES
    n_orders = {1: 40, 16: 1280, 64: 5120, 256: 5120} if not quick else {1: 10, 64: 512}
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with local_ray(num_cpus=2, extra_env=RAY_BIDDER_ENV) as cluster, \
            tempfile.TemporaryDirectory(prefix="bidhive-bench-", dir=default_state_root()) as state:
        t = time.perf_counter()
        pool = max(fleets)
        handles = spawn_bidders(fleet_specs(synthetic_fleet(pool), SEED, "heuristic"), state_dir=state)
        spawn_s = time.perf_counter() - t
        grid = []
        for n in fleets:
            cfg = synthetic_fleet(n)
            for b in batches:
                orders = evening_orders(cfg, n_orders[b])
                local = in_process_case(cfg, b, orders)
                remote = ray_case(handles, cfg, b, orders, *pipeline(b))
                grid.append({"bidders": n, "batch": b, "orders": len(orders), "ray": remote, "in_process": local,
                             "ratio_orders_per_s": round(remote["orders_per_s"] / local["orders_per_s"], 4),
                             "ratio_round_p50": round(remote["round_p50_ms"] / max(local["round_p50_ms"], 1e-9), 1)})
        extra = []
        if not quick:  # the headline case with less pipelining, for comparison
            cfg = synthetic_fleet(50)
            for k, f, n in ((1, 1, 1280), (8, 1, 5120)):
                extra.append({"bidders": 50, "batch": 64, **ray_case(handles, cfg, 64, evening_orders(cfg, n), k, f)})
        single = [single_order(handles, synthetic_fleet(n), 10 if quick else 30) for n in fleets]
        trans = transport(handles, state, quick)
        trans["round_transport"] = round_transport(handles, cluster.pids(include_driver=False))
        loopback = all(s.ip.startswith("127.") or s.ip.startswith("::ffff:127.") for s in cluster.listening_addresses())
    head = next((g for g in grid if g["bidders"] == 50 and g["batch"] == 64), None)
    one = next((s for s in single if s["bidders"] == 50), None)
    return {
        "benchmark": "ray",
        "machine": {**machine(), "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2)},
        "setup": {"actors": pool, "spawn_s": round(spawn_s, 1), "num_cpus_per_bidder": 0, "snapshots": True,
                  "deadline_s": DEADLINE_S, "loopback_only": loopback, "total_s": round(time.perf_counter() - started, 1)},
        "grid": grid,
        "ray_50x64_less_pipelining": extra,
        "single_order": single,
        "transport": trans,
        "targets": {
            "orders_per_s_50_bidders_batch_64": {"measured": head["ray"]["orders_per_s"] if head else None,
                                                 "target": 2000},
            "single_order_round_p50_ms_50_bidders": {"measured": one["p50_ms"] if one else None, "target": 60},
        },
    }


def run_round_transport() -> dict[str, Any]:
    """Only the `round_transport` experiment (25 bidders), on its own cluster."""
    from runtime.local_ray import local_ray
    from runtime.ray_bidders import RAY_BIDDER_ENV, spawn_bidders

    load_before = os.getloadavg()[0]
    with local_ray(num_cpus=2, extra_env=RAY_BIDDER_ENV) as cluster, \
            tempfile.TemporaryDirectory(prefix="bidhive-bench-", dir=default_state_root()) as state:
        handles = spawn_bidders(fleet_specs(synthetic_fleet(25), SEED, "heuristic"), state_dir=state)
        result = round_transport(handles, cluster.pids(include_driver=False))
    return {"benchmark": "ray.round_transport", "round_transport": result,
            "machine": {**machine(), "load_avg_before": round(load_before, 2),
                        "load_avg_after": round(os.getloadavg()[0], 2)}}


if __name__ == "__main__":
    import json
    import sys

    if "--round-transport" in sys.argv:
        print(json.dumps(run_round_transport(), indent=2))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
