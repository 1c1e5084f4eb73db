"""The HTTP service over real HTTP: a real Serve app on an embedded loopback Ray, bidders as actors.

One cluster and one app serve the module (starting them costs ~15 s); the last test
restarts both on the same journal. The app runs the `district` fleet (9 bidder actors)
with a bearer token and a small `max_open_orders`, so overload is reachable.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.journal import read_journal
from runtime.local_ray import LocalRay, is_loopback
from serve.config import BatchCfg, Listen, ServeCfg
from serve.runner import launch, spare_port, stop_service

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
GOOD: dict[str, Any] = {
    "customer_id": "c-1", "tier": "vip", "items": [{"sku": "sku-00003", "qty": 1}],
    "destination": {"lat": 31.2304, "lon": 121.4737}, "promise_minutes": 120, "value": 40.0,
}
OK_STATUSES = {200, 202, 401, 404, 409, 413, 415, 422, 503}


class Service:
    """A running cluster + app, restartable on the same journal."""

    def __init__(self, journal: Path) -> None:
        self.cfg = ServeCfg(fleet="district", bidders="ray", journal=str(journal), token=TOKEN, max_open_orders=24,
                            answer_timeout_s=10, max_body_bytes=4096,
                            batch=BatchCfg(window_ms=10, retry_after_ms=50, max_attempts=2))
        self.port = spare_port()
        self.cluster: LocalRay | None = None

    def start(self) -> None:
        self.cluster = launch(self.cfg, Listen(host="127.0.0.1", port=self.port))  # as `bidhive serve` does
        self.client = httpx.Client(base_url=self.url, timeout=30)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the service did not become healthy in 120 s")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.client.close()
        assert self.cluster is not None
        stop_service(self.cluster)

    def post(self, body: Any, key: str | None = None, client: httpx.Client | None = None, **kw: Any) -> httpx.Response:
        headers = {**AUTH, **({"Idempotency-Key": key} if key else {}), **kw.pop("headers", {})}
        return (client or self.client).post("/orders", json=body, headers=headers, **kw)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    mp = pytest.MonkeyPatch()
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.delenv("BIDHIVE_TOKEN", raising=False)
    service = Service(tmp_path_factory.mktemp("serve") / "journal.bhj")
    service.start()
    try:
        yield service
    finally:
        service.stop()
        mp.undo()


def _order(i: int, **patch: Any) -> dict[str, Any]:
    return {**GOOD, "customer_id": f"c-{i}", **patch}


# -- the happy path ------------------------------------------------------------------------
def test_an_order_is_awarded_and_its_timeline_tells_the_story(svc: Service) -> None:
    r = svc.post(_order(1), key="happy-1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "awarded", body
    award, auction = body["award"], body["auction"]
    assert award["source"]["kind"] == "warehouse" and award["last_mile"]["kind"] in ("rider_pool", "crowd", "locker")
    assert award["price"] > 0 and award["eta_s"] > 0 and award["score"] >= award["price"]
    assert auction["bidders_asked"] >= auction["quotes_received"] >= 2 and auction["timed_out"] == 0
    detail = svc.client.get(f"/orders/{body['order_id']}", headers=AUTH).json()
    events = [e["event"] for e in detail["events"]]
    assert events[:4] == ["received", "round_opened", "quotes", "awarded"], events
    committed = {e["agent_id"] for e in detail["events"] if e["event"] == "committed"}
    assert committed == {award["source"]["agent_id"], award["last_mile"]["agent_id"]}
    assert detail["order"]["items"] == [["sku-00003", 1]] and detail["award"] == award


def test_an_unknown_order_is_404(svc: Service) -> None:
    r = svc.client.get("/orders/nope", headers=AUTH)
    assert r.status_code == 404 and "nope" in r.json()["detail"] and "retain_orders" in r.json()["detail"]


# -- malformed input -----------------------------------------------------------------------
@pytest.mark.parametrize("patch, field", [
    ({"customer_id": None}, "customer_id"),
    ({"items": []}, "items"),
    ({"items": [{"sku": "sku-00003", "qty": 0}]}, "items.0.qty"),
    ({"items": [{"sku": "sku-00003", "qty": "two"}]}, "items.0.qty"),
    ({"items": [{"sku": "no-such-sku", "qty": 1}]}, "items.0.sku"),
    ({"destination": {"lat": 95, "lon": 121.47}}, "destination.lat"),
    ({"destination": {"lat": 40.0, "lon": 121.47}}, "destination"),  # far outside the city
    ({"promise_minutes": 0}, "promise_minutes"),
    ({"tier": "gold"}, "tier"),
    ({"category": "liquid"}, "category"),
    ({"colour": "red"}, "colour"),
])
def test_malformed_orders_are_422_naming_the_field(svc: Service, patch: dict[str, Any], field: str) -> None:
    body = {k: v for k, v in {**GOOD, **patch}.items() if v is not None}
    r = svc.post(body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field), r.json()


def test_broken_json_and_bad_keys_are_422(svc: Service) -> None:
    r = svc.client.post("/orders", content=b'{"customer_id": ', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"].startswith("body: not valid JSON at character 16"), r.text
    for body, says in ((b'{"customer_id": "\xff"}', "not valid UTF-8 (byte 0xff at position 17)"),
                       (b"[" * 3000, "not readable JSON: nested too deeply")):
        r = svc.client.post("/orders", content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"] == f"body: {says}", r.text
    r = svc.post(GOOD, headers={"Idempotency-Key": "has space"})
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"]


def test_a_body_not_sent_as_json_is_415_naming_the_content_type(svc: Service) -> None:
    form = "application/x-www-form-urlencoded"  # what `curl -d` sends without -H
    r = svc.client.post("/orders", content=json.dumps(GOOD).encode(), headers={**AUTH, "Content-Type": form})
    assert r.status_code == 415 and form in r.json()["detail"] and "application/json" in r.json()["detail"]


def test_oversized_bodies_are_413_declared_or_chunked(svc: Service) -> None:
    big = _order(2, channel="x" * 10, items=[{"sku": f"sku-{i:05d}", "qty": 1} for i in range(50)],
                 pad="y" * 5000)
    r = svc.post(big)
    assert r.status_code == 413 and "4096" in r.json()["detail"]
    payload = json.dumps(big).encode()

    def chunks() -> Iterator[bytes]:
        for k in range(0, len(payload), 512):
            yield payload[k:k + 512]

    r = svc.client.post("/orders", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text


def test_a_missing_or_wrong_token_is_401_but_health_is_open(svc: Service) -> None:
    assert svc.client.post("/orders", json=GOOD).status_code == 401
    assert svc.client.post("/orders", json={"colour": "red"}).status_code == 401  # no field errors without the token
    broken = svc.client.post("/orders", content=b'{"customer_id": ', headers={"Content-Type": "application/json"})
    assert broken.status_code == 401, broken.text  # nor whether its JSON parses
    assert svc.client.get("/strategy").status_code == 401 and svc.client.get("/orders/o-1").status_code == 401
    assert svc.client.get("/openapi.json").json()["info"]["title"] == "bidhive"  # the public schema is open
    r = svc.client.get("/metrics", headers={"Authorization": "Bearer wrong-token-000"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert svc.client.get("/healthz").json()["bidders"]["answering"] == 9


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.recursive(st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                 max_leaves=12),
    st.fixed_dictionaries({k: st.one_of(st.just(v), st.none(), st.integers(), st.text(max_size=8),
                                        st.floats(allow_nan=True), st.lists(st.integers(), max_size=2))
                           for k, v in GOOD.items()}),
))
def test_fuzzed_bodies_never_get_a_5xx(svc: Service, body: Any) -> None:
    r = svc.client.post("/orders", content=json.dumps(body, allow_nan=True).encode(),
                        headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code in OK_STATUSES, (r.status_code, r.text)


# -- idempotency ---------------------------------------------------------------------------
def test_same_key_same_body_is_one_auction(svc: Service) -> None:
    first = svc.post(_order(3), key="idem-3")
    again = svc.post({**_order(3)}, key="idem-3")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers.get("Idempotent-Replayed") == "true"
    other = svc.post(_order(4), key="idem-3")
    assert other.status_code == 422 and "different request body" in other.json()["detail"]


def _received(svc: Service) -> float:
    text = svc.client.get("/metrics", headers=AUTH).text
    line = next(ln for ln in text.splitlines() if ln.startswith("bidhive_orders_received_total "))
    return float(line.split()[1])


def test_fifty_concurrent_posts_with_one_key_make_one_auction(svc: Service) -> None:
    before = _received(svc)
    start = threading.Barrier(50)

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=svc.url, timeout=30) as own:  # a client each (see the overload test)
            start.wait()
            return svc.post(_order(5), key="burst-5", client=own)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(post, range(50)))
    codes = sorted({a.status_code for a in answers})
    assert set(codes) <= {200, 409}, codes
    ids = {a.json()["order_id"] for a in answers if a.status_code == 200}
    assert len(ids) == 1 and any(a.status_code == 200 for a in answers)
    assert _received(svc) == before + 1


def _final(svc: Service, oid: str, wait_s: float = 30.0) -> httpx.Response:
    end = time.monotonic() + wait_s
    while True:
        r = svc.client.get(f"/orders/{oid}", headers=AUTH)
        if (r.status_code == 200 and r.json()["status"] != "pending") or time.monotonic() > end:
            return r
        time.sleep(0.2)


def test_a_client_that_gives_up_does_not_cancel_its_order(svc: Service) -> None:
    # The client sends the whole order, then stops waiting before the answer. Whether the
    # request reached the desk first depends on timing (one that did not was never
    # accepted, so nothing is lost); shorter and shorter patience until one did.
    gave_up = []
    for k, patience in enumerate((0.3, 0.1, 0.03, 0.01, 0.003)):
        oid = f"gave-up-{k}"
        try:
            svc.post(_order(60 + k, order_id=oid), timeout=httpx.Timeout(10.0, read=patience))
        except httpx.ReadTimeout:
            gave_up.append(oid)
    accepted = [oid for oid in gave_up if _final(svc, oid, wait_s=5).status_code == 200]
    assert accepted, f"no order was accepted before its client gave up: {gave_up}"
    for oid in accepted:
        r = _final(svc, oid)
        assert r.json()["status"] in ("awarded", "unfulfilled"), r.text


# -- strategy, metrics, overload -----------------------------------------------------------
def test_strategy_switch_is_live_and_journaled(svc: Service) -> None:
    r = svc.client.put("/strategy", json={"profile": "time_first"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["profile"] == "time_first"
    assert svc.client.get("/healthz").json()["profile"] == "time_first"
    now = svc.client.get("/strategy", headers=AUTH).json()
    assert now["profile"] == "time_first" and {"balanced", "time_first", "vip_guard"} <= set(now["known"])
    assert svc.client.get("/strategy").status_code == 401
    bad = svc.client.put("/strategy", json={"profile": "fastest"}, headers=AUTH)
    assert bad.status_code == 422 and "time_first" in bad.json()["detail"]
    changes = [r for r in read_journal(Path(svc.cfg.journal)) if r["type"] == "profile_changed"]
    assert changes[-1]["name"] == "time_first" and changes[-1]["profile"]["value_of_time_per_h"] > 0
    svc.client.put("/strategy", json={"profile": "balanced"}, headers=AUTH)


def test_metrics_speak_prometheus(svc: Service) -> None:
    text = svc.client.get("/metrics", headers=AUTH).text
    for name in ("bidhive_orders_received_total", "bidhive_rounds_total", "bidhive_quotes_total",
                 'bidhive_clear_latency_ms_bucket{le="+Inf"}', "bidhive_open_orders", "bidhive_utilization{kind=",
                 'bidhive_orders_ended_total{reason="",status="awarded"}', 'bidhive_bidder_calls_total{outcome="timed_out"}'):
        assert name in text, name
    value = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert value["bidhive_bidder_channels"] == 9  # the district fleet's 9 bidders, all on this node
    assert value['bidhive_bidder_channel_events_total{event="opened"}'] == 9
    assert value['bidhive_bidder_channel_events_total{event="broken"}'] == 0
    health = svc.client.get("/healthz").json()
    assert value["bidhive_orders_kept"] == health["orders"] > 0 and health["orders_forgotten"] == 0
    assert value["bidhive_orders_forgotten_total"] == 0
    assert value["bidhive_journal_files"] == health["journal"]["files"] == 1  # far below journal_rotate_mb
    assert 0 < value["bidhive_journal_bytes"] <= health["journal"]["bytes"]  # the journal only grows
    # where the time went: every settled round in both phase histograms, every ended order timed once
    settled = value["bidhive_round_quote_ms_count"]
    assert 0 < settled == value["bidhive_round_settle_ms_count"] <= value["bidhive_rounds_total"]
    ended = sum(v for k, v in value.items() if k.startswith("bidhive_orders_ended_total{"))
    assert 0 < value["bidhive_order_latency_ms_count"] == ended
    assert value['bidhive_order_latency_ms_bucket{le="+Inf"}'] == ended


def test_overload_sheds_with_503_and_loses_no_accepted_order(svc: Service) -> None:
    start = threading.Barrier(160)  # all at once: over channels the bidders clear a trickle too fast to shed

    def post(i: int) -> httpx.Response:
        # A client each, as 160 customers would have: one pool shared by 160 threads once
        # failed client-side (httpcore: `ReadError: [Errno 9] Bad file descriptor`).
        with httpx.Client(base_url=svc.url, timeout=30) as own:
            own.get("/healthz")  # connected before the burst, so the POSTs leave together
            start.wait(30)
            return svc.post(_order(1000 + i, order_id=f"load-{i}"), client=own)

    with ThreadPoolExecutor(160) as pool:
        answers = list(pool.map(post, range(160)))
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 202, 503}, sorted(set(codes))
    assert 503 in codes, "160 simultaneous orders against max_open_orders=24 should shed some"
    shed = [a for a in answers if a.status_code == 503]
    assert all(int(a.headers["Retry-After"]) >= 1 for a in shed)
    accepted = [a.json()["order_id"] for a in answers if a.status_code in (200, 202)]
    assert accepted
    for oid in accepted:
        r = svc.client.get(f"/orders/{oid}", headers=AUTH)
        assert r.status_code == 200 and r.json()["status"] in ("awarded", "unfulfilled", "pending")
    for a in shed:  # a shed order was never journaled
        oid = json.loads(a.request.content)["order_id"]
        assert svc.client.get(f"/orders/{oid}", headers=AUTH).status_code == 404


def test_every_socket_is_on_loopback(svc: Service) -> None:
    assert svc.cluster is not None
    socks = svc.cluster.listening_addresses()
    assert any(s.port == svc.port for s in socks), "the HTTP listener is one of the session's processes"
    assert all(is_loopback(s.ip) for s in socks), [s for s in socks if not is_loopback(s.ip)]


def _bidder_pids(svc: Service) -> list[int]:
    assert svc.cluster is not None
    pids = []
    for pid in svc.cluster.pids(include_driver=False):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if name.startswith(b"ray::BidderProcess"):
            pids.append(pid)
    return pids


def test_bidders_killed_under_load_leave_only_answers_the_journal_backs(svc: Service) -> None:
    """Every bidder process SIGKILLed while orders stream in: Ray restarts them, every accepted
    order still ends, each answer is what GET /orders says, and every "awarded" answer is an
    award whose commits the journal holds on both sides (`test_serve_desk` forces the refused
    commits a kill can cause; here the kill mostly lands between rounds: no quotes)."""
    pids = _bidder_pids(svc)
    assert len(pids) == 9  # the district fleet, one process per resource
    answered, answers_so_far = threading.Event(), itertools.count(1)

    def post(i: int) -> httpx.Response:
        r = svc.post(_order(3000 + i, destination={"lat": 31.2304 + 0.002 * (i % 9), "lon": 121.4737}))
        if next(answers_so_far) >= 12:  # `next` on a count is atomic in CPython
            answered.set()
        return r

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, i) for i in range(60)]
        assert answered.wait(60)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        answers = [f.result() for f in futures]
    assert {a.status_code for a in answers} <= {200, 202, 503}
    final = {a.json()["order_id"]: _final(svc, a.json()["order_id"], wait_s=120).json()
             for a in answers if a.status_code in (200, 202)}
    assert all(d["status"] in ("awarded", "unfulfilled") for d in final.values()), final
    for a in answers:
        if a.status_code == 200:
            body = a.json()
            assert {k: final[body["order_id"]][k] for k in body} == body
    committed: dict[tuple[int, str], set[str]] = {}
    refused: set[tuple[int, str]] = set()
    for rec in read_journal(Path(svc.cfg.journal)):
        if rec["type"] == "hold_committed":
            for agent, oids in zip(rec["agents"], rec["orders"]):
                for oid in oids:
                    committed.setdefault((rec["round_id"], oid), set()).add(agent)
        elif rec["type"] == "hold_released":
            refused.update((rec["round_id"], oid) for oid in rec.get("refused", ()))
    for oid, d in final.items():
        if d["status"] == "awarded":
            key = (d["auction"]["round_id"], oid)
            assert key not in refused
            assert committed.get(key) == {d["award"]["source"]["agent_id"], d["award"]["last_mile"]["agent_id"]}
    end = time.monotonic() + 120
    while svc.client.get("/healthz").json()["bidders"]["answering"] < 9:  # all restarted and answering pings
        assert time.monotonic() < end, "the bidders did not come back"
        time.sleep(1.0)
    again = _bidder_pids(svc)
    assert len(again) == 9 and set(again).isdisjoint(pids)


# -- a desk whose round loop dies is restarted ---------------------------------------------
def _in_replica(fn: Any) -> Any:
    """Runs `fn(ingress)` inside the app's one replica (Serve's replica actor, reached through Ray)."""
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::") and "BidhiveIngress" in a["name"]]
    assert len(names) == 1, names
    replica = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    return ray.get(replica.__ray_call__.remote(
        lambda actor: fn(actor._replica_impl._user_callable_wrapper.user_callable)), timeout=30)


def test_a_desk_whose_round_loop_dies_is_restarted_and_resumes_its_orders(svc: Service) -> None:
    """A fault inside a round (here: the core's step raises) kills the desk's round loop.
    The order it had taken in is journaled, so its client gets 202. The keeper then starts
    a new desk and fleet on the journal, which trades that order again and answers for it;
    its key gets the final answer. The fault is injected through Serve's replica actor: the
    loop has no other way to die on purpose."""
    health = svc.client.get("/healthz").json()
    segment, restarts, fleet = health["segment"], health["desk_restarts"], _bidder_pids(svc)

    def break_the_round_loop(ingress: Any) -> bool:
        def step() -> None:
            raise RuntimeError("injected fault: a round failed")
        ingress.desk.host.core.step = step
        return bool(ingress.desk.host.alive)

    assert _in_replica(break_the_round_loop)
    taken = svc.post(_order(4000), key="heal-1")
    assert taken.status_code == 202, taken.text  # journaled before the loop died: accepted, pending
    oid = taken.json()["order_id"]
    end = time.monotonic() + 120
    while (health := svc.client.get("/healthz")).status_code != 200 or health.json()["segment"] == segment:
        assert time.monotonic() < end, f"the desk was not restarted: {health.text}"
        time.sleep(0.5)
    assert health.json()["segment"] == segment + 1 and health.json()["desk_restarts"] == restarts + 1
    final = _final(svc, oid, wait_s=60).json()
    assert final["status"] in ("awarded", "unfulfilled")
    again = svc.post(_order(4000), key="heal-1")
    assert again.status_code == 200 and again.json()["order_id"] == oid
    assert {k: final[k] for k in again.json()} == again.json()
    assert svc.post(_order(4001)).status_code == 200  # the new desk trades as usual
    again_fleet = _bidder_pids(svc)
    assert len(again_fleet) == 9 and set(again_fleet).isdisjoint(fleet)  # new bidder processes, the old ones gone
    assert health.json()["fleet_state"]["from"] == "last_stop"  # on the old processes' saved state


def test_a_poison_order_is_given_up_and_the_service_trades_on(svc: Service) -> None:
    """An order whose round always raises (here: clearing any round that holds it) kills
    the round loop twice: with its first round, then alone. The next desk gives it up
    (unfulfilled, `round_failed`) instead of dying a third time, and trades on."""
    restarts = svc.client.get("/healthz").json()["desk_restarts"]

    def poison_clearing(_: Any) -> bool:
        from market.engine import MarketEngine

        real = MarketEngine.close_round

        def close_round(self: Any, rnd: Any, quotes: Any) -> Any:
            if any(o.customer_id == "c-poison" for o in rnd.orders):
                raise RuntimeError("injected fault: this order breaks its round")
            return real(self, rnd, quotes)
        close_round.real = real  # type: ignore[attr-defined]
        MarketEngine.close_round = close_round  # type: ignore[method-assign]
        return True

    def cure_clearing(_: Any) -> bool:
        from market.engine import MarketEngine

        MarketEngine.close_round = MarketEngine.close_round.real  # type: ignore[attr-defined]
        return True

    assert _in_replica(poison_clearing)
    try:
        taken = svc.post(_order(0, customer_id="c-poison"), key="poison-1")
        assert taken.status_code == 202, taken.text  # journaled before its round died
        oid = taken.json()["order_id"]
        final = _final(svc, oid, wait_s=120).json()
        assert (final["status"], final["reason"]) == ("unfulfilled", "round_failed"), final
        assert svc.client.get("/healthz").json()["desk_restarts"] == restarts + 2
        again = svc.post(_order(0, customer_id="c-poison"), key="poison-1")
        assert again.status_code == 200 and {k: final[k] for k in again.json()} == again.json()
        assert svc.post(_order(4002)).status_code == 200  # the service trades on
        metrics = svc.client.get("/metrics", headers=AUTH).text
        assert 'bidhive_orders_ended_total{reason="round_failed",status="unfulfilled"} 1' in metrics
    finally:
        assert _in_replica(cure_clearing)


# -- restart (last: it replaces the module's cluster) --------------------------------------
def _committed_units(svc: Service) -> dict[str, int]:
    """Per bidder, the units it has committed since its state began (a new fleet starts at 0)."""
    states = _in_replica(lambda ingress: ingress.desk.host.core.bidders.states())
    return {agent_id: state["committed_units"] for agent_id, state in states.items()}


def test_restart_of_serve_and_ray_keeps_answers(svc: Service) -> None:
    """A stop and a start on the same journal: the answers and keys, the operator's profile,
    and the bidders' live state (what they committed is still theirs) carry over."""
    first = svc.post(_order(7), key="restart-7")
    assert first.status_code == 200
    oid = first.json()["order_id"]
    before = svc.client.get(f"/orders/{oid}", headers=AUTH).json()
    assert svc.client.put("/strategy", json={"profile": "cost_first"}, headers=AUTH).status_code == 200
    segment = svc.client.get("/healthz").json()["segment"]
    committed = _committed_units(svc)
    assert sum(committed.values()) >= 2  # this module's orders, source and leg each
    svc.stop()
    svc.start()
    assert _committed_units(svc) == committed  # not a new fleet: what was committed is still out
    assert svc.client.get("/healthz").json()["fleet_state"]["from"] == "last_stop"
    after = svc.client.get(f"/orders/{oid}", headers=AUTH).json()
    assert after["award"] == before["award"] and after["status"] == before["status"]
    again = svc.post(_order(7), key="restart-7")
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    fresh = svc.post(_order(8), key="restart-8")
    assert fresh.status_code == 200 and fresh.json()["order_id"] != oid
    health = svc.client.get("/healthz").json()
    assert health["segment"] == segment + 1  # one replica start, one journal segment
    assert health["profile"] == "cost_first"  # an operator's switch outlives a restart
