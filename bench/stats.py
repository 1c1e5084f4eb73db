"""Small helpers every benchmark shares: percentiles and machine facts."""
from __future__ import annotations

import os
import platform
from datetime import date

import numpy as np


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    """p50/p99/mean of durations given in seconds, in milliseconds."""
    ms = np.asarray(samples_s) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
    }


def machine() -> dict[str, object]:
    """Where and when a figure was measured."""
    return {
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
