"""The `bidhive` command line: simulate, replay, bench (and more as shells land)."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer._click.exceptions import ClickException  # typer 0.29 vendors click; its errors live here
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.registry import BENCHMARKS
from bidhive_cli.errors import UserError, exit_143_when_terminated
from bidhive_cli.output import print_kpis, to_json
from bidhive_cli.replay_cmd import USER_ERRORS as REPLAY_ERRORS
from bidhive_cli.replay_cmd import replay
from bidhive_cli.demo_cmd import demo
from bidhive_cli.rl_cmds import evaluate, train
from bidhive_cli.serve_cmds import serve
from market.config import ConfigError, load_profile, load_scenario
from market.simulator import SimSetup, Simulator
from policies.registry import PolicyError, make_policy

app = typer.Typer(
    name="bidhive",
    help="bidhive: a real-time multi-agent resource auction for order fulfilment.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

USER_ERRORS: tuple[type[Exception], ...] = (UserError, ConfigError, PolicyError, FileNotFoundError, *REPLAY_ERRORS)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not enabled, transient=True,
    )


@app.command()
def simulate(
    scenario: Annotated[str, typer.Option(help="Scenario name (configs/scenarios) or YAML path.")],
    policy: Annotated[str, typer.Option(help="static, truthful, heuristic or rl:PATH.")] = "heuristic",
    orders: Annotated[Optional[int], typer.Option(min=1, max=5_000_000, help="Orders in the day (default: the scenario's).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed for demand, agents and the world.")] = 0,
    profile: Annotated[Optional[str], typer.Option(help="Strategy profile (default: the scenario's).")] = None,
    payment: Annotated[Optional[str], typer.Option(help="first_score or second_score (default: the scenario's).")] = None,
    journal: Annotated[Optional[Path], typer.Option(help="Write the auction journal to this file.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print KPIs as JSON.")] = False,
    timing: Annotated[bool, typer.Option(help="Include wall-clock clearing times (--no-timing for byte-stable JSON).")] = True,
    ray_mode: Annotated[bool, typer.Option("--ray", help="Bidders as Ray actors (local loopback Ray, or RAY_ADDRESS); same KPIs.")] = False,
) -> None:
    """Simulate a day of fulfilment auctions and print its KPIs."""
    sc = load_scenario(scenario)
    rule = sc.payment if payment is None else payment
    if rule not in ("first_score", "second_score"):
        raise UserError(f"unknown payment rule '{rule}' (known: first_score, second_score)")
    strategy = make_policy(policy, rule)  # type: ignore[arg-type]
    chosen = load_profile(profile) if profile is not None else None
    recorder = _journal_recorder(journal, in_process=not ray_mode)
    with exit_143_when_terminated(), _no_empty_journal(recorder, journal):  # SIGTERM still raises while it closes
        setup = SimSetup.build(sc, strategy, seed=seed, n_orders=orders, profile=chosen, profile_name=profile,
                               recorder=recorder)
        with _ray_bidders(policy, seed) if ray_mode else contextlib.nullcontext() as bidders:
            sim = Simulator(setup, bidders=bidders)
            with _progress(not json_out and sys.stderr.isatty()) as bar:
                task = bar.add_task(f"{sc.name} / {policy}", total=len(sim.orders))
                kpis = sim.run(lambda done, total: bar.update(task, completed=done))
            if not timing:
                kpis = sim.report(timing=False)
    if json_out:
        typer.echo(to_json(kpis))
    else:
        print_kpis(f"bidhive simulate --scenario {sc.name} (seed {seed})", {policy: kpis})


def _ray_bidders(policy: str, seed: int):  # type: ignore[no-untyped-def]
    """`simulate --ray`: starts Ray and the bidder actors around the run (imported only when asked)."""
    from runtime.ray_bidders import ray_simulation

    return ray_simulation(policy, seed)


@contextlib.contextmanager
def _no_empty_journal(recorder: Any, path: Path | None) -> Iterator[None]:
    """A run that fails before its journal holds a record leaves no journal: the file would
    only block the retry (a journal holds one run). One with records is kept: it is the
    failed run's own record, and replay reads it."""
    try:
        yield
    except BaseException:
        if path is not None:
            from market.journal import MAGIC

            with contextlib.suppress(Exception):  # the run's own error is the one to show
                recorder.close()
                if path.stat().st_size <= len(MAGIC):
                    path.unlink()
        raise


def _journal_recorder(path: Path | None, *, in_process: bool):  # type: ignore[no-untyped-def]
    """The journal recorder for `--journal`, or the null recorder. With the bidders in this
    process the journal is written in bursts (`market.journal_batch`); with Ray bidders,
    every record at once, before any bidder hears of its round."""
    from market.recorder import NullRecorder

    if path is None:
        return NullRecorder()
    from market.journal import journal_files
    from market.journal_recorder import JournalRecorder

    if path.is_dir():
        raise UserError(f"--journal {path} is a folder: give a file name")
    try:
        journal_files(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    else:
        raise UserError(f"{path} already exists: a journal holds one run, give a new file name")
    from market.journal_batch import simulation_journal

    try:
        return simulation_journal(path) if in_process else JournalRecorder(path, fsync="interval")
    except OSError as err:
        raise UserError(f"cannot write the journal {path}: {err.strerror or err}") from None


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help=f"Benchmark: {', '.join(sorted(BENCHMARKS))}.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print results as JSON only.")] = False,
    quick: Annotated[bool, typer.Option(help="Fewer repetitions (smoke runs).")] = False,
) -> None:
    """Run a benchmark and print its JSON."""
    from bench import registry

    result = registry.run(name, quick=quick)
    typer.echo(to_json(result))


app.command("replay")(replay)
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("serve")(serve)
app.command("demo")(demo)


def main() -> None:
    """Console entry point: user mistakes become one line on stderr and exit code 2."""
    if len(sys.argv) == 1:
        sys.argv.append("--help")
    try:
        code = app(standalone_mode=False)
    except ClickException as err:
        typer.echo(f"bidhive: {err.format_message()}", err=True)
        sys.exit(2)
    except USER_ERRORS as err:
        typer.echo(f"bidhive: {err}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("bidhive: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
