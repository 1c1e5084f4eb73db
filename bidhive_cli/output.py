"""Rendering KPIs for people (rich tables) and machines (stable JSON)."""
from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table


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
    Console().print(kpi_table(title, columns))
