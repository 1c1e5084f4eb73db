"""Serve building blocks without a server: validation, idempotency, metrics."""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from market.config import ConfigError
from serve.config import ServeCfg, with_env_token
from serve.idempotency import IdempotencyConflict, IdempotencyStore, body_hash
from serve.metrics import Metrics
from serve.models import OrderIn
from serve.runner import _ephemeral_range, spare_port
from tests.factories import held_by_a_connection

GOOD = {
    "customer_id": "c-1",
    "tier": "vip",
    "items": [{"sku": "sku-00001", "qty": 2}],
    "destination": {"lat": 31.23, "lon": 121.47},
    "promise_minutes": 60,
    "value": 42.0,
    "locker_ok": True,
}


def test_a_good_order_becomes_a_market_order() -> None:
    order = OrderIn.model_validate(GOOD).to_order("o-1", now_s=100.0, reserve_base=10, reserve_share=0.4)
    assert order.promise_s == 100.0 + 3600.0 and order.reserve == pytest.approx(10 + 0.4 * 42)
    assert order.units == 2 and order.tier == "vip"


def test_the_largest_default_reserve_may_also_be_sent() -> None:
    """The reserve a client may send covers the default one a full-value order gets."""
    top = OrderIn.model_validate({**GOOD, "value": 1_000_000, "promise_minutes": 90})
    default = top.to_order("o-1", 0.0, reserve_base=10, reserve_share=0.4).reserve
    assert OrderIn.model_validate({**GOOD, "value": 1_000_000, "reserve": default}).reserve == default


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"items": []}, "items"),
        ({"items": [{"sku": "x", "qty": 0}]}, "items.0.qty"),
        ({"destination": {"lat": 91, "lon": 0}}, "destination.lat"),
        ({"promise_minutes": -5}, "promise_minutes"),
        ({"tier": "gold"}, "tier"),
        ({"colour": "red"}, "colour"),
        ({"items": [{"sku": "a", "qty": 1}, {"sku": "a", "qty": 2}]}, "items"),
        ({"items": [{"sku": "a", "qty": True}]}, "items.0.qty"),  # strict: not a 1
        ({"value": "59"}, "value"),
        ({"destination": {"lat": True, "lon": 0}}, "destination.lat"),
        ({"locker_ok": "yes"}, "locker_ok"),
        ({"customer_id": "c-1\nX-Evil: 1"}, "customer_id"),
        ({"channel": "app\x00"}, "channel"),
        ({"reserve": 1_000_001}, "reserve"),
    ],
)
def test_bad_orders_name_the_field(patch: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        OrderIn.model_validate({**GOOD, **patch})
    locs = [".".join(str(p) for p in e["loc"]) for e in err.value.errors()]
    assert field in locs, locs


def test_idempotency_state_machine() -> None:
    placed: dict[str, tuple[str, dict | None]] = {}  # what the order index knows of each key
    store = IdempotencyStore(placed.get)
    h = body_hash(GOOD)
    assert store.begin("k", h) is None
    with pytest.raises(IdempotencyConflict) as busy:
        store.begin("k", h)
    assert busy.value.status == 409
    with pytest.raises(IdempotencyConflict) as other:
        store.begin("k", body_hash({**GOOD, "value": 1.0}))
    assert other.value.status == 422
    placed["k"] = (h, None)  # journaled, still pending after the claim is gone (a restart): in flight
    store.release("k")
    with pytest.raises(IdempotencyConflict) as pending:
        store.begin("k", h)
    assert pending.value.status == 409
    placed["k"] = (h, {"order_id": "o-1", "status": "awarded"})
    assert store.begin("k", h) == {"order_id": "o-1", "status": "awarded"}
    with pytest.raises(IdempotencyConflict) as ended_other:
        store.begin("k", "another body")
    assert ended_other.value.status == 422
    assert len(store) == 0


@given(st.dictionaries(st.text(max_size=5), st.integers(), max_size=5))
def test_body_hash_ignores_key_order(body: dict) -> None:
    assert body_hash(body) == body_hash(dict(reversed(list(body.items()))))


def test_metrics_render_prometheus_text() -> None:
    m = Metrics()
    m.inc("orders_total", help="Orders received")
    m.inc("unfulfilled_total", reason="no_quote")
    for ms in (0.2, 3.0, 70.0):
        m.observe_ms("clear_ms", ms, help="Clearing time")
    text = m.render()
    assert "bidhive_orders_total 1" in text
    assert 'bidhive_unfulfilled_total{reason="no_quote"} 1' in text
    assert 'bidhive_clear_ms_bucket{le="0.5"} 1' in text and 'bidhive_clear_ms_bucket{le="+Inf"} 3' in text
    assert "bidhive_clear_ms_count 3" in text


def test_metrics_are_exact_past_a_million_and_escaped() -> None:
    """Six significant digits (`:g`) would print 1234567 as 1.23457e+06: `rate()` would see steps of ten."""
    m = Metrics()
    m.inc("orders_total", 1_234_567, help='Orders "received"\\ here\nand there')
    m.set("journal_bytes", 268_435_455)
    m.set("share", 0.1 + 0.2)
    m.inc("odd_total", why='a "b"\\c\nd')
    m.observe_ms("clear_ms", 1234567.25)
    lines = m.render().splitlines()
    assert "bidhive_orders_total 1234567" in lines and "bidhive_journal_bytes 268435455" in lines
    assert f"bidhive_share {0.1 + 0.2!r}" in lines and "bidhive_clear_ms_sum 1234567.25" in lines
    assert '# HELP bidhive_orders_total Orders "received"\\\\ here\\nand there' in lines
    assert 'bidhive_odd_total{why="a \\"b\\"\\\\c\\nd"} 1' in lines


def test_the_token_comes_from_the_environment_where_the_config_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken where the app is built: a replica on a joined cluster never sees the variable."""
    monkeypatch.delenv("BIDHIVE_TOKEN", raising=False)
    assert with_env_token(ServeCfg()).token is None
    monkeypatch.setenv("BIDHIVE_TOKEN", "from-env-0123")
    assert with_env_token(ServeCfg()).token == "from-env-0123"
    assert with_env_token(ServeCfg(token="from-config-1")).token == "from-config-1"
    for bad in ("short", "two words", "caf\u00e9-token"):
        monkeypatch.setenv("BIDHIVE_TOKEN", bad)
        with pytest.raises(ConfigError, match="BIDHIVE_TOKEN: token"):
            with_env_token(ServeCfg())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydantic, inside ray.serve
def test_bodies_that_cannot_be_decoded_say_why() -> None:
    """What FastAPI answers 400 for (its JSON reader raised something else than a decode
    error) is the client's mistake: the service says 422 and why (`serve.app._unreadable`)."""
    import json

    from serve.app import _why_unreadable

    def raised(text: bytes) -> BaseException:
        try:
            json.loads(text)
        except (ValueError, RecursionError) as err:
            return err
        raise AssertionError("parsed")

    assert _why_unreadable(raised(b'"\xff"')) == "not valid UTF-8 (byte 0xff at position 1)"
    assert _why_unreadable(raised(b"[" * 3000)) == "not readable JSON: nested too deeply"
    assert _why_unreadable(raised(b"9" * 4400)) == "not readable JSON: a number with too many digits"


def test_spare_ports_are_outside_the_ephemeral_range_and_skip_busy_ones() -> None:
    """A port from the ephemeral range can become an outgoing connection's source port
    before Serve binds it; spare_port stays below that range and passes over a port a
    connection holds."""
    ephemeral_low = _ephemeral_range()[0]
    assert all(spare_port() < ephemeral_low for _ in range(20))
    first = spare_port(rng=random.Random(7))
    with held_by_a_connection(first):
        again = spare_port(rng=random.Random(7))
    assert again != first and again < ephemeral_low
