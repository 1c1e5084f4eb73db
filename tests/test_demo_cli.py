"""`bidhive demo`: one readable line when no service listens; bodies the service accepts; KPI arithmetic."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bidhive_cli.demo_cmd import Tally, kpis, synthetic_bodies
from market.catalogue import Catalogue
from market.config import load_fleet
from serve.models import OrderIn
from serve.runner import spare_port


def test_demo_without_a_service_is_one_line_and_exit_2() -> None:
    url = f"http://127.0.0.1:{spare_port()}"
    out = subprocess.run([sys.executable, "-m", "bidhive_cli.main", "demo", "--url", url, "--orders", "5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the bidhive service" in lines[0] and url in lines[0], out.stderr


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BIDHIVE_TOKEN"}
    return subprocess.run([sys.executable, "-m", "bidhive_cli.main", "demo", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_million_orders_against_no_service_fail_at_once() -> None:
    """The service is looked for before a million bodies are drawn (half a minute)."""
    started = time.monotonic()
    out = _demo("--url", f"http://127.0.0.1:{spare_port()}", "--orders", "1000000")
    assert out.returncode == 2 and "cannot reach" in out.stderr and time.monotonic() - started < 20, out.stderr


class _Guarded(BaseHTTPRequestHandler):
    """A bidhive-like service that wants a token nobody has."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        ok = self.path == "/healthz"
        body = b'{"status":"ok","auctioneer":"running"}' if ok else b'{"detail":"missing or wrong bearer token"}'
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def guarded() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Guarded)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_missing_token_and_a_refused_one_are_told_apart(guarded: str) -> None:
    none = _demo("--url", guarded, "--orders", "5")
    wrong = _demo("--url", guarded, "--orders", "5", "--token", "not-the-token")
    assert none.returncode == 2 and "wants a bearer token: pass --token" in none.stderr, none.stderr
    assert wrong.returncode == 2 and "refused the bearer token given" in wrong.stderr, wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fleet", ["default", "metro"])
def test_order_bodies_validate_against_the_request_model(fleet: str) -> None:
    bodies = synthetic_bodies(300, fleet=fleet, seed=3)
    skus = set(Catalogue.build(load_fleet(fleet).catalogue).sku_ids)
    for body in bodies:
        order = OrderIn.model_validate(body)
        assert order.promise_minutes >= 1
        assert {item.sku for item in order.items} <= skus
    assert {b["tier"] for b in bodies} == {"vip", "regular"}
    assert len({b["category"] for b in bodies}) > 1


def test_kpis_count_awards_and_price_only_awarded_orders() -> None:
    tally = Tally(placed=4)
    tally.statuses.update({"200": 2, "202": 1, "503": 1})
    tally.latencies_s += [0.010, 0.030]
    for kind, price in (("rider_pool", 4.0), ("crowd", 6.0)):
        tally.record_answer({"status": "awarded", "award": {"price": price, "last_mile": {"kind": kind},
                                                             "source": {"agent_id": "wh-a"}}})
    tally.record_answer({"status": "unfulfilled", "award": None})
    result = kpis(tally, wall_s=2.0)
    assert result["orders"] == 4 and result["accepted"] == 3
    assert result["fulfilled_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["cost_per_order"] == 5.0
    assert result["leg_mix"] == {"rider_pool": 0.5, "crowd": 0.5}
    assert result["awards_by_source"] == {"wh-a": 2}
    assert "on_time_rate" not in result
