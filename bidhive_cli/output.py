"""Rendering KPIs for people (rich tables) and machines (stable JSON)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table


#: The exit status of a command whose reader stopped early (`bidhive replay J | head`): what
#: a shell reports for a process killed by SIGPIPE. Never 1, which `replay --verify` keeps
#: for "the journal differs".
EXIT_BROKEN_PIPE = 141


class _StdoutConsole(Console):
    def on_broken_pipe(self) -> None:
        """Rich's own handler exits 1; see `EXIT_BROKEN_PIPE`."""
        devnull = os.open(os.devnull, os.O_WRONLY)  # later flushes at exit find a sink, not an error
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(EXIT_BROKEN_PIPE)


def stdout_console() -> Console:
    """The console for a command's report: piped output gets a wide page instead of rich's
    80 columns, and a reader that stops early ends the command with `EXIT_BROKEN_PIPE`."""
    return _StdoutConsole() if sys.stdout.isatty() else _StdoutConsole(width=200)


def to_json(data: Any) -> str:
    """Stable JSON: sorted keys, so the same run gives the same bytes."""
    return json.dumps(data, sort_keys=True, indent=2)


def fmt_value(value: Any) -> str:
    """A KPI value for a table cell: 4 decimals, '-' for none, dicts inline."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt_value(v)}" for k, v in value.items()) or "-"
    return str(value)


def kpi_table(title: str, columns: dict[str, dict[str, Any]]) -> Table:
    """One row per KPI, one column per run (policy)."""
    table = Table(title=title)
    table.add_column("KPI")
    for name in columns:
        table.add_column(name, justify="right")
    keys = list(next(iter(columns.values())).keys())
    for key in keys:
        table.add_row(key, *(fmt_value(col.get(key)) for col in columns.values()))
    return table


def print_kpis(title: str, columns: dict[str, dict[str, Any]]) -> None:
    """Prints the KPI table to stdout."""
    stdout_console().print(kpi_table(title, columns))
