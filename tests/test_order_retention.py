"""The service's memory stays bounded: ended orders are archived, then forgotten past
`retain_orders`, and whatever is still kept answers exactly as if nothing had been."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.auctioneer import AWARDED, OrderLedger
from market.journal import read_journal
from serve.config import BatchCfg, ServeCfg
from serve.desk import DeskError, OrderDesk
from serve.idempotency import body_hash
from serve.models import OrderIn
from serve.order_archive import OrderArchive
from serve.order_index import OrderIndex
from tests.factories import order_body, place_all

N_ORDERS = 144  # two chunks of the archive and part of a third


def _desk(journal: Path) -> OrderDesk:
    return OrderDesk(ServeCfg(fleet="district", bidders="local", journal=str(journal),
                              batch=BatchCfg(window_ms=2, retry_after_ms=5, max_attempts=2)))


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("retention") / "j.bhj"
    desk = _desk(path)
    try:
        place_all(desk, range(N_ORDERS))
    finally:
        desk.close()
    return path


def _index(journal: Path, **kw: Any) -> tuple[OrderIndex, list[str]]:
    """The index over the journal, and the order ids in the order they ended."""
    index, ended = OrderIndex(**kw), []
    for rec in read_journal(journal):
        ended += index.apply(rec)
    return index, ended


@settings(max_examples=25, deadline=None)
@given(retain=st.integers(1, N_ORDERS + 4), hot=st.integers(16, 24))
def test_what_is_kept_answers_as_if_nothing_were_forgotten(journal: Path, retain: int, hot: int) -> None:
    """`hot` covers the orders of the rounds still open (8 per round here, two rounds in
    flight), as the desk's does (`ended_kept_live`); the archive gets the rest."""
    full, ended = _index(journal)
    bounded, _ = _index(journal, retain=retain, hot=hot)
    kept = ended[-max(retain, hot):]  # the newest ended orders; the hot ones always stay
    assert len(ended) == N_ORDERS and len(bounded) == len(kept)
    assert bounded.forgotten == N_ORDERS - len(kept) and len(bounded.orders) == min(hot, N_ORDERS)
    for oid in ended:
        if oid in kept:  # JSON is what a client sees: msgpack gives lists where the view had tuples
            assert json.dumps(bounded.detail(oid)) == json.dumps(full.detail(oid))
            assert bounded.answer(oid) == full.answer(oid)
        else:
            assert not bounded.knows(oid) and bounded.detail(oid) is None and bounded.answer(oid) is None
    for key, oid in full.keys.items():
        assert bounded.by_key(key) == (full.by_key(key) if oid in kept else None)


def test_the_archive_is_a_fraction_of_the_live_views(journal: Path) -> None:
    """What archiving is for: the same orders in a small part of the memory."""
    live, _ = _index(journal)
    archived, _ = _index(journal, hot=0)
    assert len(archived.orders) == 0 and len(archived.archive) == N_ORDERS
    blob_bytes = archived.archive.stored_bytes()
    view_bytes = sum(len(json.dumps(v.detail())) for v in live.orders.values())
    assert blob_bytes < view_bytes / 3, (blob_bytes, view_bytes)


def test_a_service_forgets_old_orders_and_their_keys_and_still_serves(tmp_path: Path) -> None:
    desk = _desk(tmp_path / "j.bhj")
    try:
        desk.index.retain, desk.index.hot = 10, 4  # the setting's floor is 10,000; the rule is the same
        answers = place_all(desk, range(30))
        old, recent = answers[1], answers[-1]  # both placed with a key (odd i)
        assert desk.order(old["order_id"]) is None and desk.order(recent["order_id"]) is not None
        repeat = desk.place(OrderIn.model_validate(order_body(29)), body_hash(order_body(29)), "k-29")
        assert repeat.answer == recent
        with pytest.raises(DeskError) as other_body:
            desk.place(OrderIn.model_validate(order_body(28)), body_hash(order_body(28)), "k-29")
        assert other_body.value.status == 422
        again = place_all(desk, range(1, 2))[0]  # k-1 is forgotten: the repeat is a new order
        assert again["order_id"] != old["order_id"]
        health = desk.health()[1]
        assert health["orders"] == 10 and health["orders_forgotten"] == 21
        assert len(desk.idem) == 0 and len(desk.host.core.ledger.orders) <= 4096
        assert "bidhive_orders_forgotten_total 21" in desk.metrics_text()
    finally:
        desk.close()
    rebuilt, _ = _index(tmp_path / "j.bhj", retain=10, hot=4)  # a restart forgets what the service forgot
    kept = [a["order_id"] for a in [*answers, again] if desk.index.knows(a["order_id"])]
    assert rebuilt.forgotten == desk.index.forgotten and len(kept) == 10
    assert all(json.dumps(rebuilt.detail(oid)) == json.dumps(desk.index.detail(oid)) for oid in kept)


def test_the_ledger_forgets_ended_orders_but_counts_them() -> None:
    ledger = OrderLedger(keep_ended=2)
    for i in range(5):
        ledger.submit(f"o-{i}")
        ledger.in_round(f"o-{i}", i)
    for i in range(4):
        ledger.awarded(f"o-{i}", "wh", "riders")
    assert set(ledger.orders) == {"o-2", "o-3", "o-4"} and ledger.open == 1
    assert ledger.counts() == {AWARDED: 4, "in_round": 1}


def test_the_retention_bench_measures_what_it_says() -> None:
    from bench.retention_bench import run

    result = run(quick=True)
    last = {arm: runs[-1] for arm, runs in result["arms"].items()}
    assert all(r["orders"] == result["orders"] for r in last.values())
    assert last["archived"]["archived"] == result["orders"] and last["live"]["archived"] == 0
    assert last["archived"]["index_bytes_per_order"] < last["live"]["index_bytes_per_order"] / 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.just("pop"), st.integers(0, 3)), max_size=40), st.integers(1, 4))
def test_the_archive_is_a_first_in_first_out_store(steps: list[Any], chunk: int) -> None:
    """Whatever the chunk size and the mix of puts and forgets, each kept order reads back
    exactly as put, and forgetting goes oldest first."""
    archive, model, n = OrderArchive(chunk=chunk), {}, 0
    for step in steps:
        if step == "pop":
            if model:
                oldest = next(iter(model))
                assert archive.pop_oldest() == (oldest, model.pop(oldest)[0])
            continue
        oid, key = f"o-{n}", (f"k-{n}" if step else None)
        model[oid] = (key, f"h-{n}", {"order_id": oid, "events": [{"event": "x", "n": i} for i in range(step)]})
        archive.put(oid, *model[oid])
        n += 1
    assert len(archive) == len(model)
    for oid, want in model.items():
        assert archive.get(oid) == want
    assert all(archive.get(f"o-{i}") is None for i in range(n) if f"o-{i}" not in model)
