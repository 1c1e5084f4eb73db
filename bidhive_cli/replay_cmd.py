"""`bidhive replay FILE`: re-clear a journal, verify it, ask what-if, explain an order, plot.

The logic lives in `market.replay`; this module only parses options, shows progress and
prints. Every user mistake (missing file, not a journal, corrupt journal, unknown
profile or order) ends as one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bidhive_cli.errors import UserError, check_png_path, warnings_as_lines
from bidhive_cli.output import fmt_value, stdout_console, to_json
from market.clearing import PAYMENT_RULES
from market.config import load_profile
from market.journal import MAGIC, JournalError
from market.replay import ReplayError, ReplayReport, explain, plot, replay as run_replay

KPI_ROWS = (
    "orders", "fulfilled", "fulfilled_rate", "cost_per_order", "mean_score", "on_time_rate_predicted", "vip_orders",
    "vip_fulfilled_rate", "vip_on_time_rate_predicted", "award_share.rider_pool", "award_share.crowd",
    "award_share.locker", "rounds", "round_award_rate", "duplicate_awards", "unfulfilled", "p50_clear_ms", "p99_clear_ms",
)


@contextmanager
def _user_facing(path: Path) -> Iterator[None]:
    """Warnings as single lines; OS errors about the journal as user errors."""
    with warnings_as_lines():
        try:
            yield
        except FileNotFoundError as err:
            raise UserError(str(err) if "no journal" in str(err) else f"no journal at {path}") from None
        except IsADirectoryError:
            raise UserError(f"{path} is a directory, not a journal") from None
        except OSError as err:
            raise UserError(f"cannot read {err.filename or path}: {err.strerror or err}") from None


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A progress callback `(orders_read, expected)` drawing a rich bar on stderr, or a no-op."""
    if not enabled:
        yield None
        return
    bar = Progress(SpinnerColumn(), TextColumn("[bold]replay"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("orders"), TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    with bar:
        task = bar.add_task("replay", total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _flat(kpis: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in kpis.items() if not isinstance(v, dict) or k == "unfulfilled"}
    for kind, share in kpis.get("award_share", {}).items():
        out[f"award_share.{kind}"] = share
    return out


def _kpi_table(report: ReplayReport) -> Table:
    cols: dict[str, dict[str, Any]] = {"logged": _flat(report.logged.report())}
    if report.replayed is not None:
        cols["re-cleared"] = _flat(report.replayed.report())
    if report.what_if is not None:
        s = report.what_if_settings or {}
        cols[f"what-if ({s.get('profile')}, {s.get('payment')})"] = _flat(report.what_if.report())
        cols["Δ what-if − logged"] = {k: v for k, v in _flat(report.kpi_diff()).items() if k != "unfulfilled"}
    table = Table(title=f"bidhive replay {report.path}")
    table.add_column("KPI")
    for name in cols:
        table.add_column(name, justify="right")
    for key in KPI_ROWS:
        table.add_row(key, *(fmt_value(col.get(key)) for col in cols.values()))
    return table


def _explain_table(result: dict[str, Any]) -> None:
    console = stdout_console()
    console.print(f"[bold]order {result['order_id']}[/bold]: {result['outcome']}")
    for r in result["rounds"]:
        o = r["order"]
        console.print(
            f"\nround {r['round_id']} (seq {r['seq']}, opened {r['opened_s']:.1f} s, attempt {r['attempt']}, "
            f"{r['round_size']} order(s), served at position {r['service_position']}) — {r['mechanism']}, profile {r['profile']}\n"
            f"  {o['tier']} {o['category']} order, promise {o['promise_s']:.1f} s, reserve {o['reserve']:.2f}, "
            f"unserved penalty {o['unserved_penalty']:.2f}\n  rule: {r['rule']}")
        table = Table(show_lines=False)
        for col in ("#", "source", "leg", "kind", "price", "ETA min", "rel", "score", "feasible", "result / why not"):
            table.add_column(col, justify="right" if col in ("#", "price", "ETA min", "rel", "score") else "left",
                             no_wrap=col != "result / why not")
        for c in r["combinations"]:
            verdict = "WINNER" if c["winner"] else ("; ".join(c["why_not"]) or "ranked below the winner")
            table.add_row(str(c["rank"]), c["source"], c["leg"], c["leg_kind"], f"{c['price']:.2f}", f"{c['eta_min']:.1f}",
                          f"{c['reliability']:.3f}", f"{c['score']:.3f}", "yes" if c["feasible"] else "no", verdict)
        console.print(table)
        console.print(f"  verdict: {r['verdict']}")
        if r.get("matches_log") is False:
            console.print("  [red]the logged award differs from this re-clear (run --verify)[/red]")
    if result["verdict"] != (result["rounds"][-1]["verdict"] if result["rounds"] else None):
        console.print(result["verdict"])  # the order's end, where its last round does not say it


def replay(
    file: Annotated[Path, typer.Argument(help="Journal file (the first file of a rotated journal).", show_default=False)],
    verify: Annotated[bool, typer.Option("--verify", help="Exit 1 at the first award, payment or score that differs.")] = False,
    profile: Annotated[Optional[str], typer.Option(help="What-if: re-clear under this strategy profile.")] = None,
    payment: Annotated[Optional[str], typer.Option(help="What-if: re-clear with this payment rule (first_score, second_score).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    plot_to: Annotated[Optional[Path], typer.Option("--plot", help="Draw KPIs over time into this PNG.")] = None,
    order: Annotated[Optional[str], typer.Option("--order", help="Explain how this order's rounds cleared.")] = None,
) -> None:
    """Re-clear every round of an auction journal: verify it, compare a what-if, explain an order, plot KPIs."""
    if payment is not None and payment not in PAYMENT_RULES:
        raise UserError(f"unknown payment rule '{payment}' (known: {', '.join(PAYMENT_RULES)})")
    what_if = load_profile(profile) if profile is not None else None
    if plot_to is not None:
        check_png_path(plot_to)
    if order is not None and (verify or plot_to is not None):
        raise UserError("--order explains one order; run --verify or --plot without it")
    if file.is_file() and file.stat().st_size < len(MAGIC):  # a header torn at creation: no run to warn about
        raise UserError(f"{file}: {'empty' if not file.stat().st_size else 'too short'} (no journal header): "
                        "nothing to replay")
    with _user_facing(file):
        if order is not None:
            result = explain(file, order, profile=what_if, payment=payment)
            if json_out:
                typer.echo(to_json(result))
            else:
                _explain_table(result)
            return
        show = not json_out and sys.stderr.isatty()
        with _progress(show) as progress:
            report = run_replay(file, profile=what_if, profile_name=profile, payment=payment, verify=verify,
                                stop_at_first=verify, progress=progress)
    if plot_to is not None:
        try:
            plot(report, plot_to)
        except OSError as err:
            raise UserError(f"cannot write the plot {plot_to}: {err.strerror or err}") from None
    failed = verify and not report.ok
    if json_out:
        out = report.as_dict()
        if plot_to is not None:
            out["plot"] = str(plot_to)
        typer.echo(to_json(out))
    else:
        _print_report(report, verify, plot_to)
    if failed:
        drift = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in report.version_drift().items())
        note = f" (written with other versions: {drift})" if drift else ""
        typer.echo(f"bidhive: verify failed: {report.first_mismatch}{note}", err=True)
        raise typer.Exit(1)


def _print_report(report: ReplayReport, verify: bool, plot_to: Path | None) -> None:
    h = report.header
    console = stdout_console()
    console.print(f"journal {report.path}: {sum(report.records.values())} records, {report.rounds} rounds; "
                  f"policy {h.policy}, mechanism {h.mechanism}, profile {h.profile_name}, {len(h.bidder_ids)} bidders, "
                  f"seed {h.seed}")
    drift = report.version_drift()
    if drift:
        console.print("note: the journal was written with other versions: "
                      + ", ".join(f"{k} {a} (now {b})" for k, (a, b) in drift.items()))
    if report.verified_rounds:
        if report.ok:
            console.print(f"verified {report.verified_rounds} rounds: every award, payment, score and predicted delivery "
                          "matches the journal bit for bit")
        elif not verify:
            console.print(f"[red]{report.mismatched_rounds} of {report.verified_rounds} rounds differ from the journal; "
                          f"first: {report.first_mismatch}[/red]")
    console.print(_kpi_table(report))
    console.print("KPIs count each order once by its final outcome; on-time rates use the predicted delivery "
                  "(the journal has no realised times); award_share is the share of awards by last-mile kind.")
    if report.what_if is not None:
        console.print("what-if: same quotes and retry schedule as the journal, cleared under the what-if settings.")
    if plot_to is not None:
        console.print(f"plot written to {plot_to}")


USER_ERRORS: tuple[type[Exception], ...] = (ReplayError, JournalError)
