"""A closed-loop capacity probe against a service that is already running (A/B of settings).

    python -m bench.serve_probe http://127.0.0.1:8000 --users 48 --seconds 20

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

from bench.serve_load import BODIES, closed_summary, loadavg, run_phase


def probe(url: str, users: int, seconds: float, warmup_s: float = 3.0) -> dict[str, object]:
    """Orders/s and latency of `200`s with `users` clients each posting as soon as answered."""
    from bidhive_cli.demo_cmd import synthetic_bodies

    workdir = Path(tempfile.mkdtemp(prefix="bidhive-probe-"))
    try:
        (workdir / "bodies.json").write_text(json.dumps(synthetic_bodies(BODIES, fleet="metro", seed=7)))
        before = loadavg()
        raw = run_phase(workdir, url, f"probe-{users}", "closed", users, seconds, drain_s=10.0)
        return {"url": url, **closed_summary(raw, users, seconds, warmup_s), "loadavg": [before, loadavg()]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    """Command-line entry: prints one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(json.dumps(probe(args.url, args.users, args.seconds)))


if __name__ == "__main__":
    main()
