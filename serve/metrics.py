"""Prometheus text exposition without a client library: counters and histograms."""
from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict

LATENCY_BUCKETS_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 75, 100, 150, 250, 500, 1000, 2500)


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escaped(v, quote=True)}"' for k, v in labels)
    return "{" + inner + "}"


def _escaped(text: str, quote: bool = False) -> str:
    """Backslash and newline escaped (and the double quote, in a label value), as the text format asks."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _value(v: float) -> str:
    """A sample value exact to the unit: counters pass a million within hours, where `:g`
    would round them to six digits (and `rate()` would see steps of ten)."""
    v = float(v)
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


class Metrics:
    """A small registry: named counters with labels, gauges and latency histograms."""

    def __init__(self, prefix: str = "bidhive") -> None:
        self.prefix = prefix
        self._counters: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._hist: dict[str, list[int]] = {}
        self._hist_sum: dict[str, float] = {}
        self._help: dict[str, str] = {}

    def inc(self, name: str, amount: float = 1.0, help: str = "", **labels: str) -> None:
        """Adds to a counter."""
        key = tuple(sorted(labels.items()))
        self._counters[name][key] = self._counters[name].get(key, 0.0) + amount
        self._help.setdefault(name, help)

    def set_total(self, name: str, value: float, help: str = "", **labels: str) -> None:
        """Sets a counter to a running total kept elsewhere (it must never go down)."""
        self._counters[name][tuple(sorted(labels.items()))] = value
        self._help.setdefault(name, help)

    def set(self, name: str, value: float, help: str = "", **labels: str) -> None:
        """Sets a gauge."""
        self._gauges[name][tuple(sorted(labels.items()))] = value
        self._help.setdefault(name, help)

    def observe_ms(self, name: str, ms: float, help: str = "") -> None:
        """Records one latency sample in milliseconds."""
        counts = self._hist.setdefault(name, [0] * (len(LATENCY_BUCKETS_MS) + 1))
        counts[bisect_left(LATENCY_BUCKETS_MS, ms)] += 1
        self._hist_sum[name] = self._hist_sum.get(name, 0.0) + ms
        self._help.setdefault(name, help)

    def counter(self, name: str, **labels: str) -> float:
        """Current value of a counter (0 when never touched)."""
        return self._counters.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        out: list[str] = []
        for kind, family in (("counter", self._counters), ("gauge", self._gauges)):
            for name, series in sorted(family.items()):
                full = f"{self.prefix}_{name}"
                out += [f"# HELP {full} {_escaped(self._help.get(name, ''))}", f"# TYPE {full} {kind}"]
                out += [f"{full}{_labels(k)} {_value(v)}" for k, v in sorted(series.items())]
        for name, counts in sorted(self._hist.items()):
            full = f"{self.prefix}_{name}"
            out += [f"# HELP {full} {_escaped(self._help.get(name, ''))}", f"# TYPE {full} histogram"]
            running = 0
            for bound, count in zip((*LATENCY_BUCKETS_MS, float("inf")), counts):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'{full}_bucket{{le="{le}"}} {running}')
            out += [f"{full}_sum {_value(self._hist_sum[name])}", f"{full}_count {running}"]
        return "\n".join(out) + "\n"
