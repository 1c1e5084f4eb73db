"""`bidhive train` and `bidhive evaluate`: the learned bidder from the command line.

torch and SB3 are imported inside the commands, so the rest of the CLI stays quick.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from bidhive_cli.errors import UserError, check_png_path, file_in_the_way, warnings_as_lines
from market.config import load_fleet, load_scenario
from market.types import Kind

ALGOS = ("ppo", "sac")
REWARDS = ("profit", "network")
OTHERS = ("heuristic", "truthful")  # not static: see `train`


def _choice(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        raise UserError(f"unknown {what} '{value}' (known: {', '.join(known)})")
    return value


def train(
    scenario: Annotated[str, typer.Option(help="Scenario name (configs/scenarios) or YAML path.")],
    out: Annotated[Path, typer.Option(help="Run folder: policy.zip, card.json, TensorBoard logs, checkpoints.")],
    timesteps: Annotated[int, typer.Option(min=1, max=100_000_000, help="Environment steps (learner bids).")] = 40_000,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed for the model and every env.")] = 0,
    algo: Annotated[str, typer.Option(help="ppo or sac.")] = "ppo",
    reward: Annotated[str, typer.Option(help="profit (the learner's own) or network (the fleet's cost).")] = "profit",
    kind: Annotated[str, typer.Option(help="Kind of the learning bidder.")] = Kind.RIDER_POOL.value,
    fleet: Annotated[str, typer.Option(help="Fleet to train in ('scenario' for the scenario's own).")] = "district",
    orders: Annotated[Optional[int], typer.Option(min=1, max=5_000_000, help="Orders in a training day (default 4,300, which suits the district fleet; about 30,000 for --fleet scenario; with --journal, all of its orders).")] = None,
    journal: Annotated[Optional[Path], typer.Option(help="Trace-driven: every training day replays this journal's orders (real demand) instead of the scenario's generator.")] = None,
    others: Annotated[str, typer.Option(help="Policy of the other bidders: heuristic or truthful.")] = "heuristic",
    peers: Annotated[Optional[str], typer.Option(help="rl:PATH: the other bidders of the learner's kind bid with this frozen policy (self-play).")] = None,
    n_envs: Annotated[int, typer.Option(min=1, max=16, help="Parallel training envs.")] = 2,
    eval_every: Annotated[int, typer.Option(min=1, help="Steps between evaluations and checkpoints.")] = 20_000,
    card_episodes: Annotated[int, typer.Option(min=0, help="Held-out episodes summarised in card.json.")] = 3,
    progress: Annotated[bool, typer.Option(help="Show the SB3 progress bar.")] = True,
) -> None:
    """Train a learned bidder with SB3 (progress bar, TensorBoard logs under OUT/tb)."""
    load_scenario(scenario)  # a bad name fails here, before torch loads
    _choice(algo, ALGOS, "algorithm")
    _choice(reward, REWARDS, "reward mode")
    if others == "static":  # `static` routes by rule and pays the quote: a markup never costs an award
        raise UserError("--others static ignores price, so a higher markup would only ever pay more: nothing to "
                        "learn; train among heuristic or truthful bidders (evaluate still has a static row)")
    _choice(others, OTHERS, "policy for the other bidders")
    try:
        Kind(kind)
    except ValueError:
        raise UserError(f"unknown kind '{kind}' (known: {', '.join(k.value for k in Kind)})") from None
    if fleet != "scenario":
        load_fleet(fleet)  # here, not in each training env's process
    if peers is not None:
        if not (peers.startswith("rl:") and Path(peers[3:]).is_file()):
            raise UserError(f"--peers must be rl:PATH to an existing policy.zip, got '{peers}'")
        _usable(Path(peers[3:]))
        peers = f"rl:{Path(peers[3:]).resolve()}"  # the card names it so that evaluate finds it from anywhere
    if not str(out).strip() or out == Path("."):
        raise UserError("--out names the run's own folder: give a new one (not the current folder)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the run")
    blocked = file_in_the_way(out)
    if blocked is not None:
        raise UserError(f"--out {out}: {blocked} is a file, not a folder")
    if out.exists() and (out / "policy.zip").exists():
        raise UserError(f"{out} already holds a trained policy: give a new --out folder")
    if journal is not None:
        _demand_in(journal)
    from policies.train import DEFAULT_ORDERS, TrainArgs, train as run_training

    args = TrainArgs(
        scenario=scenario, timesteps=timesteps, out=str(out), seed=seed, algo=algo, reward=reward,  # type: ignore[arg-type]
        kind=kind, fleet=None if fleet == "scenario" else fleet, others=others, peers=peers, n_envs=n_envs,
        n_orders=orders if orders is not None or journal is not None else DEFAULT_ORDERS,
        journal=str(journal.resolve()) if journal is not None else None,
        eval_every=eval_every, card_episodes=card_episodes, progress=progress and sys.stderr.isatty(),
    )
    card = run_training(args)
    card["command"] = " ".join(["bidhive", *sys.argv[1:]])  # what reproduces this run
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    typer.echo(json.dumps({k: card[k] for k in ("algo", "scenario", "seed", "timesteps", "learn_wall_s", "wall_s")}, sort_keys=True))
    typer.echo(f"wrote {out / 'policy.zip'}, {out / 'card.json'}, {out / 'learning_curve.png'}")


def _demand_in(journal: Path) -> None:
    """A journal a training day can replay: readable, and holding orders."""
    from envs.fulfilment import orders_from_journal
    from market.journal import JournalError

    if not journal.is_file():
        raise UserError(f"--journal {journal}: {'a folder, not a journal' if journal.is_dir() else 'file not found'}")
    try:
        with warnings_as_lines():
            found = orders_from_journal(journal)
    except (JournalError, OSError) as err:
        raise UserError(f"--journal {journal}: {err}") from None
    if not found:
        raise UserError(f"--journal {journal} holds no orders to train on")


def _usable(policy: Path) -> None:
    """A policy file the rl row can bid with. The live bidders fall back to the heuristic on
    one that is not (`policies.rl.RLPolicy`); an evaluation of that fallback would report
    the heuristic under the policy's name, so here it is an error."""
    import logging

    from policies.rl import RLPolicy

    quiet = logging.getLogger("bidhive.rl")
    was_disabled, quiet.disabled = quiet.disabled, True  # the warning would repeat what the error says
    try:
        loaded = RLPolicy(policy)
    finally:
        quiet.disabled = was_disabled
    if not loaded.loaded:
        raise UserError(f"{policy} is not a policy the rl row can use ({loaded.fallback_reason})")


def evaluate(
    policy: Annotated[Path, typer.Option(help="A policy.zip written by `bidhive train`.")],
    scenario: Annotated[Optional[str], typer.Option(help="Scenario (default: the one the policy was trained on).")] = None,
    episodes: Annotated[int, typer.Option(min=1, max=1000, help="Held-out days per baseline.")] = 10,
    orders: Annotated[Optional[int], typer.Option(min=1, max=5_000_000, help="Orders per day (default: as trained).")] = None,
    fleet: Annotated[Optional[str], typer.Option(help="Fleet (default: as trained; 'scenario' for the scenario's own).")] = None,
    rows: Annotated[str, typer.Option(help="Comma-separated rows: static, heuristic, truthful, rl, exact.")] = "static,heuristic,rl,exact",
    workers: Annotated[int, typer.Option(min=1, max=16, help="Episodes run in parallel processes.")] = 2,
    self_play: Annotated[bool, typer.Option(help="In the rl row, every bidder of the learner's kind uses the policy.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Learning-curve PNG (default: the one next to the policy, drawn if missing).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
) -> None:
    """Evaluate a learned bidder against static, heuristic and exact on held-out days."""
    from envs.evaluation import POLICIES, dumps, evaluate as run_eval, learning_curve, summary_table
    from policies.rl import read_card

    if policy.is_dir():
        raise UserError(f"--policy {policy} is a folder: give its policy.zip")
    if not policy.is_file():
        raise UserError(f"{policy}: file not found")
    if plot is not None:
        check_png_path(plot)  # before the evaluation, which a bad path would otherwise lose
    _usable(policy)
    if scenario is not None:
        load_scenario(scenario)
    chosen = tuple(dict.fromkeys(r.strip() for r in rows.split(",") if r.strip()))  # a row twice would count twice
    if not chosen:
        raise UserError(f"--rows names no row (known: {', '.join(POLICIES)})")
    for r in chosen:
        _choice(r, POLICIES, "row")
    if fleet is not None and fleet != "scenario":
        load_fleet(fleet)
    card = read_card(policy)
    trace = (card.get("env") or {}).get("journal")
    if trace and not Path(trace).is_file():
        raise UserError(f"{policy} was trained on the orders of the journal {trace}, which is not there now")
    if not card:
        typer.echo(f"bidhive: no card.json for {policy} (beside it, or its run's for a checkpoint): it is "
                   "evaluated in the default env, which may not be the one it was trained in", err=True)
    report = run_eval(policy, scenario=scenario, episodes=episodes, policies=chosen, n_orders=orders, workers=workers,
                      fleet=fleet, self_play=self_play)
    beside = policy.with_name("learning_curve.png")  # `train` drew it from the same logs: left as it is
    png = beside if plot is None and beside.is_file() else learning_curve(policy.parent, plot or beside)
    report["learning_curve"] = str(png) if png else None
    if json_out:
        typer.echo(dumps(report))
        return
    from rich.table import Table

    from bidhive_cli.output import stdout_console

    table = Table(title=f"bidhive evaluate {policy} on {report['env']['scenario']} "
                        f"({episodes} held-out days, mean ± 95% CI; reward: {report['reward']})")
    table.add_column("metric")
    for row in report["summary"]:
        table.add_column(row, justify="right")
    for line in summary_table(report):
        table.add_row(*line)
    console = stdout_console()
    console.print(table)
    for name, diffs in report["paired"].items():
        d = diffs["learner_reward"]
        if d["mean"] is not None:
            ci = f" ± {d['ci95']:.2f}" if d["ci95"] is not None else ""
            console.print(f"paired {name}: learner reward {d['mean']:+.2f}{ci}")
    if png:
        console.print(f"learning curve: {png}")
