"""Bidders spread over two Ray nodes (`ray.cluster_utils.Cluster`), all on 127.0.0.1.

`Cluster` starts real raylets in this process's session, so the module sets up what
`runtime.local_ray.start_local_ray` would: the loopback environment (`LOOPBACK_ENV`:
Ray's node IP becomes 127.0.0.1 and every server binds there), token auth with a fresh
0600 token file, and a short private temp dir (`RAY_TMPDIR` too, so not even the
`ray_current_cluster` address file lands in /tmp/ray). It checks no process of the
session listens anywhere but loopback, and removes everything afterwards.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from agents.actor import fleet_specs  # noqa: E402
from agents.fleet import build_fleet  # noqa: E402
from market.auctioneer import AWARDED, TERMINAL, AuctioneerCore, BatchPolicy, OrdersClock  # noqa: E402
from market.config import load_profile  # noqa: E402
from market.engine import MarketEngine  # noqa: E402
from policies.registry import make_policy  # noqa: E402
from runtime import local_ray as lr  # noqa: E402
from runtime.owner import proc_stat, wait_gone  # noqa: E402
from runtime.ray_bidders import RAY_BIDDER_ENV, RayBidders, spawn_bidders  # noqa: E402
from tests.test_ray_runtime import FLEET, SEED, orders_at  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and a worker node, each advertising one CPU, loopback-only with token auth."""
    if ray.is_initialized():
        pytest.skip("Ray already initialised in this process")
    tmp = tempfile.mkdtemp(prefix="bh-cl-", dir="/tmp")  # short: unix socket paths stay < 107 chars
    token = os.path.join(tmp, "auth_token")
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    env: dict[str, str | None] = {**lr.LOOPBACK_ENV, **RAY_BIDDER_ENV, "RAY_AUTH_MODE": "token",
                                  "RAY_AUTH_TOKEN_PATH": token, "RAY_AUTH_TOKEN": None, "RAY_ADDRESS": None,
                                  "RAY_TMPDIR": tmp}
    saved = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    old_flag = lr._set_cluster_flag(False)
    lr._refresh_auth_state()
    c = None
    try:
        os.mkdir(os.path.join(tmp, "ray"))  # Ray's default temp dir under RAY_TMPDIR: sessions and address file
        head = dict(num_cpus=1, temp_dir=os.path.join(tmp, "ray"), include_dashboard=False,
                    node_ip_address=lr.LOOPBACK_IP)
        c = Cluster(initialize_head=True, connect=True, head_node_args=head)
        c.add_node(num_cpus=1, resources={"second_node": 1.0}, node_ip_address=lr.LOOPBACK_IP)
        c.wait_for_nodes()
        yield c
    finally:
        procs = {pid: st[2] for pid in lr.session_pids(tmp) if (st := proc_stat(pid)) is not None}
        ray.shutdown()
        if c is not None:
            c.shutdown()
        left = wait_gone(procs, 15.0)
        for pid in left:  # same start time checked: never a reused pid
            os.kill(pid, 9)
        left = wait_gone(left, 3.0)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        lr._set_cluster_flag(old_flag)
        lr._refresh_auth_state()
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"cluster processes survived SIGKILL: {sorted(left)}"
        assert not os.path.exists(tmp)
        assert not left, f"cluster processes left behind: {sorted(left)}"


def test_bidders_on_two_nodes_clear_rounds(cluster: Cluster) -> None:
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    specs = fleet_specs(FLEET, SEED, "heuristic")
    place = {s.agent_id: {"scheduling_strategy": NodeAffinitySchedulingStrategy(nodes[k % 2], soft=False)}
             for k, s in enumerate(specs)}
    with tempfile.TemporaryDirectory(prefix="bh-st-") as state:  # one path: the nodes share this host's disk
        handles = spawn_bidders(specs, state_dir=state, per_agent=place)
        states: list[dict[str, Any]] = ray.get([h.state.remote() for h in handles.values()])
        assert {s["node_id"] for s in states} == set(nodes)  # bidders on both nodes

        fleet = build_fleet(FLEET, SEED)
        rb = RayBidders(fleet, handles, deadline_s=1.0)
        here = ray.get_runtime_context().get_node_id()
        on_this_node = {s["agent_id"] for s in states if s["node_id"] == here}
        assert on_this_node and set(rb.channels) == on_this_node  # the other node's bidders keep Ray calls
        engine = MarketEngine(fleet, make_policy("heuristic"), load_profile("balanced"), rb, seed=SEED)
        core = AuctioneerCore(engine, BatchPolicy(window_s=0.0, max_batch=8, max_attempts=2, retry_after_s=0.0),
                              market=OrdersClock(follow_wall=False))
        core.submit(orders_at(32, 31))
        assert core.run_until_idle(120)
        assert rb.totals["timed_out"] == rb.totals["failed"] == rb.totals["invalid"] == 0
        ledger = core.ledger.orders
        assert all(st.status in TERMINAL for st in ledger.values())
        winners = {aid for st in ledger.values() if st.status == AWARDED for aid in st.award or ()}
        node_of = {s["agent_id"]: s["node_id"] for s in states}
        assert {node_of[a] for a in winners} == set(nodes)  # both nodes' bidders won work
        after = ray.get([h.state.remote() for h in handles.values()])
        assert not any(s["violations"] for s in after)
        for h in handles.values():
            ray.kill(h)

    own = {os.getpid()} | lr.session_pids(os.environ["RAY_TMPDIR"])
    wide = [s for s in lr.listening_addresses(own) if not lr.is_loopback(s.ip)]
    assert not wide, f"listening beyond loopback: {wide}"
