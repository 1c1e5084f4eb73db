"""Random but valid market inputs for tests: orders, rounds and quote books; replay reports without their
timings; a port held by an open connection; an owner process that is gone."""
from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from market.book import QuoteBook, build_book
from market.config import ProfileCfg, load_profile
from market.geo import CityGrid
from market.round import Round, SourceSites, build_round
from market.types import Category, Item, Kind, LegQuote, Order, Quote, SourceQuote, Tier
from runtime.owner import write_owner
from serve.idempotency import body_hash
from serve.models import OrderIn

if TYPE_CHECKING:  # the desk brings Ray in; the market tests that use this module need none of it
    from serve.desk import OrderDesk

GRID = CityGrid(31.2304, 121.4737)
LEG_KINDS = (Kind.RIDER_POOL, Kind.CROWD, Kind.LOCKER)
REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """The environment of a `python -m bidhive_cli.main` child: this checkout first on its path."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
ORDER_BODY: dict[str, Any] = {
    "customer_id": "c-1", "items": [{"sku": "sku-00003", "qty": 1}],
    "destination": {"lat": 31.2304, "lon": 121.4737}, "promise_minutes": 120, "value": 40.0,
}


def order_body(i: int) -> dict[str, Any]:
    """A `POST /orders` body of customer `i`, its destination spread over a few km."""
    return {**ORDER_BODY, "customer_id": f"c-{i}",
            "destination": {"lat": 31.2304 + 0.01 * (i % 7 - 3), "lon": 121.4737 + 0.012 * (i % 5 - 2)}}


def place_all(desk: OrderDesk, ids: range, batch: int = 8) -> list[dict[str, Any]]:
    """Places `order_body(i)` for each i, a batch at a time (so rounds hold several), every
    other one with the key ``k-i``; the answers, in order."""
    answers: list[dict[str, Any]] = []
    for start in range(ids.start, ids.stop, batch):
        placed = [desk.place(OrderIn.model_validate(order_body(i)), body_hash(order_body(i)),
                             f"k-{i}" if i % 2 else None) for i in range(start, min(start + batch, ids.stop))]
        answers += [p.answer or p.future.result(30) for p in placed]  # type: ignore[union-attr]
    return answers


def make_order(i: int, rng: np.random.Generator, now: float = 0.0) -> Order:
    """A random order near the city centre."""
    lat, lon = GRID.to_latlon(rng.uniform(-5, 5), rng.uniform(-5, 5))
    return Order(
        order_id=f"t-{i}", created_s=now, customer_id=f"c-{i}",
        tier=Tier.VIP if rng.uniform() < 0.3 else Tier.REGULAR, channel="app",
        items=(Item("sku-00001", int(rng.integers(1, 3))),), lat=float(lat), lon=float(lon),
        promise_s=now + float(rng.uniform(600, 7200)), value=50.0,
        category=Category.AMBIENT, locker_ok=bool(rng.uniform() < 0.5), reserve=float(rng.uniform(8, 30)),
    )


def random_round(seed: int, n_orders: int, n_sources: int) -> Round:
    """A round of random orders with `n_sources` warehouse sites."""
    rng = np.random.default_rng(seed)
    orders = [make_order(i, rng) for i in range(n_orders)]
    sites = SourceSites(tuple(f"wh-{s}" for s in range(n_sources)), rng.uniform(-5, 5, n_sources),
                        rng.uniform(-5, 5, n_sources), np.ones((n_sources, 4), dtype=bool))
    return build_round(1, 0.0, orders, sites, GRID, {"sku-00001": 1})


def random_quotes(rnd: Round, seed: int, n_legs: int) -> tuple[list[Quote], dict[str, Kind]]:
    """Random source and leg quotes with random coverage and small capacities."""
    rng = np.random.default_rng(seed + 1)
    quotes: list[Quote] = []
    kinds: dict[str, Kind] = {}
    for sid in rnd.sources.ids:
        idx = np.nonzero(rng.uniform(size=rnd.size) < 0.8)[0]
        if len(idx):
            quotes.append(SourceQuote(sid, idx, rng.uniform(1, 4, len(idx)), rng.uniform(60, 900, len(idx)),
                                      float(rng.uniform(0.85, 1.0)), int(rng.integers(1, 4))))
            kinds[sid] = Kind.WAREHOUSE
    for j in range(n_legs):
        s_idx, o_idx = (a.ravel() for a in np.meshgrid(np.arange(len(rnd.sources.ids)), np.arange(rnd.size), indexing="ij"))
        keep = rng.uniform(size=len(o_idx)) < 0.7
        if keep.any():
            n = int(keep.sum())
            lid = f"leg-{j}"
            quotes.append(LegQuote(lid, o_idx[keep], s_idx[keep], rng.uniform(2, 15, n), rng.uniform(0, 1200, n),
                                   rng.uniform(300, 3600, n), float(rng.uniform(0.8, 1.0)), int(rng.integers(1, 4))))
            kinds[lid] = LEG_KINDS[j % 3]
    return quotes, kinds


def random_book(seed: int, n_orders: int, n_sources: int, n_legs: int, profile: ProfileCfg | None = None) -> QuoteBook:
    """A scored quote book over random quotes."""
    rnd = random_round(seed, n_orders, n_sources)
    quotes, kinds = random_quotes(rnd, seed, n_legs)
    return build_book(rnd, quotes, kinds, profile or load_profile("balanced"))


def untimed(report: Any) -> dict[str, Any]:
    """A replay report as JSON, less what times this machine (seconds, clearing percentiles)."""
    out = json.loads(json.dumps(report.as_dict()))
    del out["seconds"], out["rounds_per_s"]
    for kpis in out["kpis"].values():
        del kpis["p50_clear_ms"], kpis["p99_clear_ms"]
    return out


@contextlib.contextmanager
def held_by_a_connection(port: int, host: str = "127.0.0.1") -> Iterator[None]:
    """`port` as the source port of an open loopback connection: no listener can bind it
    (what an outgoing connection does to a port taken from the ephemeral range)."""
    with socket.socket() as server, socket.socket() as client:
        server.bind((host, 0))
        server.listen()
        client.bind((host, port))
        client.connect(server.getsockname())
        yield


def refuse_commits(bidders: Any, round_id: int, awards: dict[str, Any], quoted: list[str], now: float) -> set[int]:
    """What `LocalBidders.settle` reports when every winner refuses its commit (a crashed
    bidder, a lost hold): all holds released, every awarded order refused."""
    for agent_id in quoted:
        bidders.by_id[agent_id].release(round_id, now)
    return {line.order_idx for lines in awards.values() for line in lines}


def dead_owner(directory: Path, name: str, **facts: Any) -> None:
    """Notes an owner of `directory` that is gone: this process's pid with another start
    time, as a process that has exited and whose pid was given to this one reads."""
    write_owner(directory, name, **facts)
    record = json.loads((directory / name).read_text())
    (directory / name).write_text(json.dumps({**record, "started": record["started"] - 1}))
