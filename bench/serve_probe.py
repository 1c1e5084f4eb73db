"""Probes of a service that is already running, for A/Bs of settings: closed-loop capacity,
or open-loop latency at a fixed rate.

    python -m bench.serve_probe http://127.0.0.1:8000 --users 48 --seconds 20   # capacity
    python -m bench.serve_probe http://127.0.0.1:8000 --rate 200 --seconds 15   # latency at 200/s

Same generator and orders as `bench/serve_load.py` (locust at nice 19, metro-fleet peak
orders), but it starts nothing: run it against two services started two ways, one after
the other, and compare within the same spell of machine load.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench.serve_load import BODIES, closed_summary, loadavg, open_summary, run_phase


def probe(url: str, users: int, seconds: float, rate: float | None = None, warmup_s: float = 3.0) -> dict[str, object]:
    """Closed loop (`rate` None): orders/s and latency with `users` clients each posting as soon
    as answered. Open loop: order k sent at k / rate by a pool of `users`, latency by status."""
    from bidhive_cli.demo_cmd import synthetic_bodies

    workdir = Path(tempfile.mkdtemp(prefix="bidhive-probe-"))
    try:
        (workdir / "bodies.json").write_text(json.dumps(synthetic_bodies(BODIES, fleet="metro", seed=7)))
        before = loadavg()
        if rate is None:
            raw = run_phase(workdir, url, f"probe-{users}", "closed", users, seconds, drain_s=10.0)
            summary = closed_summary(raw, users, seconds, warmup_s)
        else:
            raw = run_phase(workdir, url, f"rate-{rate:g}", "open", users, seconds, rate=rate, drain_s=10.0)
            summary = open_summary(raw, rate, users, seconds)
        return {"url": url, **summary, "loadavg": [before, loadavg()]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    """Command-line entry: prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=None, help="open loop at this many orders/s")
    args = parser.parse_args()
    users = args.users if args.rate is None else max(args.users, int(args.rate * 6))  # 6 s of answers in flight
    print(json.dumps(probe(args.url, users, args.seconds, args.rate)))


if __name__ == "__main__":
    main()
