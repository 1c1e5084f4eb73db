"""`bidhive demo`: drive a running service with a stream of synthetic orders and show its KPIs.

The orders come from the market's own demand generator (the peak scenario by default),
so SKUs, destinations, tiers and categories look like a real evening, and they are
posted open-loop at a fixed rate (at most `--concurrency` in flight) the way channels
send them: each with its own `Idempotency-Key`. Answers are tallied live; orders the
service answered 202 `pending` are looked up at the end so they count with their
outcome. On-time delivery is not knowable while the orders are still on the road, so
the demo does not report it.
"""
from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import httpx
import numpy as np
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from bidhive_cli.errors import UserError
from bidhive_cli.output import print_kpis, to_json
from market.types import Order

#: Consecutive connection failures after which the service counts as gone (not as slow).
MAX_TRANSPORT_FAILURES = 20
#: Seconds the live orders/s figure looks back over.
RATE_WINDOW_S = 2.0
#: How long the end of the demo waits for orders answered 202 `pending` to end.
PENDING_WAIT_S = 15.0


def order_body(order: Order) -> dict[str, Any]:
    """The `POST /orders` body for a generated order (the service stamps its own clock).

    The service assigns the order id and the reserve (from the value), as it does for a
    channel that sends neither.
    """
    return {
        "customer_id": order.customer_id,
        "tier": order.tier.value,
        "channel": order.channel,
        "items": [{"sku": item.sku, "qty": item.qty} for item in order.items],
        "destination": {"lat": round(order.lat, 6), "lon": round(order.lon, 6)},
        "promise_minutes": max(1.0, round((order.promise_s - order.created_s) / 60.0, 3)),
        "value": order.value,
        "category": order.category.value,
        "locker_ok": order.locker_ok,
    }


def synthetic_bodies(n: int, fleet: str = "default", scenario: str = "peak", seed: int = 0) -> list[dict[str, Any]]:
    """n order bodies from the demand generator, for the fleet the service runs.

    The catalogue is built the way the service's desk builds it, so every SKU is one the
    service knows; destinations fall in the fleet's city.
    """
    from market.catalogue import Catalogue
    from market.config import load_fleet, load_scenario
    from market.demand import generate_orders

    cfg = load_fleet(fleet)
    orders = generate_orders(load_scenario(scenario), cfg, Catalogue.build(cfg.catalogue), n, seed)
    return [order_body(o) for o in orders]


@dataclass
class Tally:
    """What the service answered so far (updated by the request tasks, read by the display)."""

    placed: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    prices: list[float] = field(default_factory=list)
    legs: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    pending: list[str] = field(default_factory=list)
    recent: deque[float] = field(default_factory=deque)
    transport_failures: int = 0
    fatal: str | None = None

    @property
    def answered(self) -> int:
        """Requests that got an HTTP answer or failed in transport."""
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        """Answers that placed no order: 4xx, 5xx and transport failures."""
        return sum(n for code, n in self.statuses.items() if code not in ("200", "202"))

    def record_answer(self, answer: dict[str, Any]) -> None:
        """Counts a final answer (from `POST` or from the pending lookup)."""
        status = str(answer.get("status"))
        self.outcomes[status] += 1
        award = answer.get("award")
        if status == "awarded" and award:
            self.prices.append(float(award["price"]))
            self.legs[str(award["last_mile"]["kind"])] += 1
            self.sources[str(award["source"]["agent_id"])] += 1

    def rate(self, now: float) -> float:
        """Answers per second over the last RATE_WINDOW_S seconds."""
        while self.recent and self.recent[0] < now - RATE_WINDOW_S:
            self.recent.popleft()
        return len(self.recent) / RATE_WINDOW_S

    def latency_ms(self, q: float) -> float | None:
        """A percentile of `200` answer latencies in ms (None before the first)."""
        if not self.latencies_s:
            return None
        return round(float(np.percentile(self.latencies_s, q)) * 1000.0, 1)


def _base_url(url: str) -> str:
    """The service's base URL without a trailing slash; a malformed one is a user error."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as err:
        raise UserError(f"--url {url}: {err}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UserError(f"--url {url}: give the service's address, like http://127.0.0.1:8000")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise UserError(f"--url {url}: port {parsed.port} is out of range (1-65535)")
    return url.rstrip("/")


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _preflight(client: httpx.AsyncClient, url: str, token_given: bool) -> None:
    """Fails in one line when nothing answers at `url`, or when it wants another token."""
    try:
        health = await client.get("/healthz", timeout=5.0)
        auth = await client.get("/metrics", timeout=10.0)
    except httpx.HTTPError as err:
        raise UserError(f"cannot reach the bidhive service at {url} ({_reason(err)}); "
                        f"start it with `bidhive serve` or pass --url") from None
    if health.status_code == 404 or "auctioneer" not in health.text:
        raise UserError(f"{url} answers, but it is not a bidhive service (GET /healthz: {health.status_code})")
    if auth.status_code == 401 and token_given:
        raise UserError(f"{url} refused the bearer token given (--token or BIDHIVE_TOKEN)")
    if auth.status_code == 401:
        raise UserError(f"{url} wants a bearer token: pass --token or set BIDHIVE_TOKEN")


def _reason(err: httpx.HTTPError) -> str:
    """The short cause of a transport failure ('connection refused', 'timed out').

    httpx words a refused connection as 'All connection attempts failed'; the cause
    chain underneath says what happened.
    """
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = cause.__cause__ or cause.__context__
    if isinstance(err, httpx.TimeoutException):
        return "timed out"
    if isinstance(err, httpx.UnsupportedProtocol):
        return "not an http:// URL"
    return (str(err).strip() or type(err).__name__).splitlines()[0]


async def _place(client: httpx.AsyncClient, body: dict[str, Any], key: str, tally: Tally) -> None:
    """Posts one order and counts its answer."""
    started = time.perf_counter()
    tally.placed += 1
    try:
        resp = await client.post("/orders", json=body, headers={"Idempotency-Key": key})
    except httpx.HTTPError as err:
        tally.statuses["transport_error"] += 1
        tally.transport_failures += 1
        if tally.transport_failures >= MAX_TRANSPORT_FAILURES:
            tally.fatal = f"lost the bidhive service at {client.base_url} ({_reason(err)})"
        return
    tally.transport_failures = 0
    done = time.perf_counter()
    tally.recent.append(done)
    tally.statuses[str(resp.status_code)] += 1
    if resp.status_code == 200:
        tally.latencies_s.append(done - started)
        tally.record_answer(resp.json())
    elif resp.status_code == 202:
        tally.pending.append(str(resp.json()["order_id"]))


async def _stream(client: httpx.AsyncClient, bodies: list[dict[str, Any]], rate: float, concurrency: int,
                  tally: Tally) -> None:
    """Posts the bodies open-loop at `rate` per second, at most `concurrency` in flight."""
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    run = uuid.uuid4().hex[:10]
    start = time.perf_counter()
    for i, body in enumerate(bodies):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        if tally.fatal:
            slots.release()
            break
        task = asyncio.create_task(_place(client, body, f"demo-{run}-{i}", tally))
        tasks.add(task)
        task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
    await asyncio.gather(*tasks)


async def _resolve_pending(client: httpx.AsyncClient, tally: Tally, wait_s: float = PENDING_WAIT_S) -> None:
    """Looks up orders answered 202 until they end (or `wait_s` passes); counts their outcome."""
    deadline = time.perf_counter() + wait_s
    left = list(tally.pending)
    while left and time.perf_counter() < deadline:
        still: list[str] = []
        for i, order_id in enumerate(left):
            try:
                resp = await client.get(f"/orders/{order_id}")
            except httpx.HTTPError:  # the service went away: what is unresolved stays pending
                still += left[i:]
                break
            answer = resp.json() if resp.status_code == 200 else {}
            if answer.get("status") in ("awarded", "unfulfilled"):
                tally.record_answer(answer)
            else:
                still.append(order_id)
        left = still
        if left:
            await asyncio.sleep(0.5)
    tally.outcomes["pending"] += len(left)


def kpis(tally: Tally, wall_s: float) -> dict[str, Any]:
    """The demo's KPIs (names as elsewhere in bidhive; on-time is not knowable live)."""
    accepted = tally.statuses.get("200", 0) + tally.statuses.get("202", 0)
    awarded = tally.outcomes.get("awarded", 0)
    return {
        "orders": tally.placed,
        "accepted": accepted,
        "fulfilled_rate": round(awarded / accepted, 4) if accepted else None,
        "cost_per_order": round(float(np.mean(tally.prices)), 4) if tally.prices else None,
        "outcomes": dict(sorted(tally.outcomes.items())),
        "p50_latency_ms": tally.latency_ms(50),
        "p99_latency_ms": tally.latency_ms(99),
        "orders_per_s": round(tally.answered / wall_s, 1) if wall_s > 0 else None,
        "status_codes": dict(sorted(tally.statuses.items())),
        "leg_mix": _shares(tally.legs),
        "awards_by_source": dict(tally.sources.most_common()),
    }


def _shares(counts: Counter[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: round(n / total, 4) for k, n in counts.most_common()} if total else {}


def _stats_lines(tally: Tally) -> tuple[str, str]:
    """The running counts, and the running rate and latency (two lines: fits 80 columns)."""
    p50, p99 = tally.latency_ms(50), tally.latency_ms(99)
    lat = f"p50 {p50:.0f} ms  p99 {p99:.0f} ms" if p50 is not None and p99 is not None else "p50 -  p99 -"
    counts = (f"placed {tally.placed}  awarded {tally.outcomes.get('awarded', 0)}  "
              f"unfulfilled {tally.outcomes.get('unfulfilled', 0)}  errors {tally.errors}")
    return counts, f"{tally.rate(time.perf_counter()):.0f} orders/s  latency {lat}"


class LiveView:
    """The live display: a bar of answered orders over a line of running figures.

    Redrawn from the event loop four times a second (not per answer: percentiles cost,
    and a redraw thread would read the tally while requests change it).
    """

    def __init__(self, total: int, tally: Tally) -> None:
        self.tally = tally
        self.bar = Progress(TextColumn("[bold]answered"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.task = self.bar.add_task("answered", total=total)

    def render(self) -> Group:
        """The display as of now."""
        self.bar.update(self.task, completed=self.tally.answered)
        return Group(self.bar, *(Text(line) for line in _stats_lines(self.tally)))

    async def run(self, live: Live) -> None:
        """Redraws until cancelled."""
        while True:
            live.update(self.render(), refresh=True)
            await asyncio.sleep(0.25)


async def _run(url: str, make_bodies: Callable[[], list[dict[str, Any]]], rate: float, concurrency: int,
               token: str | None, live: bool) -> tuple[Tally, float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=_headers(token), limits=limits,
                                 timeout=httpx.Timeout(30.0, connect=5.0)) as client:
        await _preflight(client, url, token_given=bool(token))
        bodies = make_bodies()  # after the check: a million bodies take half a minute to draw
        tally = Tally()
        view = LiveView(len(bodies), tally)
        console = Console(stderr=True, quiet=not live)
        with Live(view.render(), console=console, auto_refresh=False) as display:
            ticker = asyncio.create_task(view.run(display))
            started = time.perf_counter()
            try:
                await _stream(client, bodies, rate, concurrency, tally)
            finally:
                ticker.cancel()
            wall_s = time.perf_counter() - started
            display.update(view.render(), refresh=True)
        if tally.fatal:
            raise UserError(tally.fatal)
        await _resolve_pending(client, tally)
        return tally, wall_s


def demo(
    url: Annotated[str, typer.Option(help="Base URL of a running `bidhive serve`.")] = "http://127.0.0.1:8000",
    orders: Annotated[int, typer.Option(min=1, max=1_000_000, help="Orders to place.")] = 500,
    rate: Annotated[float, typer.Option(min=0.1, max=100_000, help="Orders per second (open loop).")] = 50.0,
    concurrency: Annotated[int, typer.Option(min=1, max=4096, help="Most requests in flight at once.")] = 64,
    token: Annotated[Optional[str], typer.Option(envvar="BIDHIVE_TOKEN", show_envvar=True,
                                                 help="Bearer token, when the service wants one.")] = None,
    fleet: Annotated[str, typer.Option(help="The service's fleet (for SKUs and destinations).")] = "default",
    scenario: Annotated[str, typer.Option(help="Demand scenario the orders are drawn from.")] = "peak",
    seed: Annotated[int, typer.Option(min=0, help="Seed for the generated orders.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the KPIs as JSON.")] = False,
) -> None:
    """Place a stream of synthetic orders against a running service and print its KPIs."""
    from market.config import load_fleet, load_scenario

    base = _base_url(url)
    load_fleet(fleet)  # a misspelt name first, then the service, then the orders
    load_scenario(scenario)
    tally, wall_s = asyncio.run(_run(base, lambda: synthetic_bodies(orders, fleet, scenario, seed), rate, concurrency,
                                     token, sys.stderr.isatty()))
    result = kpis(tally, wall_s)
    if json_out:
        typer.echo(to_json(result))
    else:
        print_kpis(f"bidhive demo: {orders} orders at {rate:g}/s against {url}", {"demo": result})
