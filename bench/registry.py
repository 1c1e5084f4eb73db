"""Benchmarks by name, for `bidhive bench NAME`."""
from __future__ import annotations

import importlib
from typing import Any

from bidhive_cli.errors import UserError

BENCHMARKS = {
    "clearing": "bench.clearing",
    "peakday": "bench.peakday",
    "replay": "bench.replay_bench",
    "retention": "bench.retention_bench",
    "restart": "bench.restart_bench",
    "journal": "bench.journal_bench",
    "journal-ablation": "bench.journal_ablation",
    "journal-instructions": "bench.journal_instructions",
    "ray": "bench.ray_bench",
    "rl": "bench.rl_bench",
    "serve": "bench.serve_load",
    "snapshot": "bench.snapshot_bench",
}


def run(name: str, quick: bool = False) -> dict[str, Any]:
    """Runs a benchmark module's `run` and returns its JSON-ready result."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark '{name}' (known: {', '.join(sorted(BENCHMARKS))})")
    return importlib.import_module(BENCHMARKS[name]).run(quick=quick)
