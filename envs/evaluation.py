"""Evaluate a learned bidder against the baselines on held-out days, and plot its training.

Every row (`bidhive evaluate` runs all but `truthful` unless `--rows` says) is an episode
of the same env the policy was trained in (its `card.json`
says which), on held-out simulator seeds that training never draws
(`HELD_OUT_BASE + k`; training draws below `TRAIN_SEEDS`):

| row | other bidders and mechanism | the learning bidder bids |
|---|---|---|
| static | today's rule, everyone paid cost | at cost |
| heuristic | heuristic markups, greedy scoring auction | the heuristic markup |
| truthful | cost quotes, greedy scoring auction (the mechanism alone) | at cost |
| rl | heuristic markups, greedy scoring auction | the learned policy |
| exact | cost quotes, exact min-cost assignment (MILP each round) | at cost |

Reported per row: the learner's own reward (its profit, or the network reward for a
`network` policy), both reward totals, and the day's KPIs; mean with a 95% t-interval
over the episodes, plus paired differences (same seeds) of rl against each baseline.
"""
from __future__ import annotations

import csv
import json
import math
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from envs.fulfilment import DEFAULT_REWARD_SCALE, HELD_OUT_BASE, FulfilmentAuctionEnv
from policies.base import BiddingStrategy, CostPricing
from policies.heuristic import LoadMarkup
from policies.rl import RLPolicy, encode_action, read_card

POLICIES: tuple[str, ...] = ("static", "heuristic", "truthful", "rl", "exact")
KPI_KEYS: tuple[str, ...] = ("cost_per_order", "vip_on_time_rate", "on_time_rate", "fulfilled_rate", "efficiency_vs_exact")
PROFIT_SCALE = DEFAULT_REWARD_SCALE["profit"]
ROW_OTHERS = {"static": "static", "heuristic": "heuristic", "truthful": "truthful", "exact": "exact"}


def held_out_seeds(episodes: int) -> list[int]:
    """Simulator seeds for evaluation, disjoint from every seed training can draw."""
    return [HELD_OUT_BASE + k for k in range(episodes)]


def env_kwargs(
    card: dict[str, Any], scenario: str | None = None, n_orders: int | None = None, fleet: str | None = None
) -> dict[str, Any]:
    """The env a policy was trained in (from its card), with optional overrides.

    A different fleet (`scenario` for the scenario's own) also picks its own learner:
    the largest bidder of the trained kind.
    """
    kw = dict(card.get("env") or {})
    if fleet:
        kw["fleet"] = None if fleet == "scenario" else fleet
        kw.pop("learner_id", None)
    kw.setdefault("scenario", card.get("scenario", "peak"))
    if scenario:
        kw["scenario"] = scenario
    if n_orders:
        kw["n_orders"] = n_orders
    return kw


def run_episode(policy_path: str, row: str, kw: dict[str, Any], sim_seed: int) -> dict[str, Any]:
    """One held-out day of one row; returns the learner's rewards and the day's KPIs."""
    kw = dict(kw)
    rl = row == "rl"
    kw["others"] = kw.get("others", "heuristic") if rl else ROW_OTHERS[row]
    if not rl:
        kw.pop("peers", None)  # a baseline row is the baseline for every bidder
    kw["exact_every"] = None  # efficiency_vs_exact is reported, so sample exact clearing as the scenario says
    env = FulfilmentAuctionEnv(**kw)
    model = RLPolicy(policy_path) if rl else None
    strategy: BiddingStrategy = LoadMarkup() if row == "heuristic" else CostPricing()
    obs, _ = env.reset(options={"sim_seed": sim_seed})
    done, info = env._done, {}
    while not done:
        if model is not None and model.loaded:
            action = model.act(obs)
        else:
            assert env.context is not None
            action = encode_action((model.fallback if model else strategy).decide(env.context), env.holdback)
        obs, _, done, _, info = env.step(action)
    if not info:
        info = env._final_info()
    mode = kw.get("reward", "profit")
    kpis = info["kpis"]
    out = {"row": row, "seed": sim_seed, "learner_reward": info["learner_profit"] if mode == "profit" else info["network_reward"],
           "learner_profit": info["learner_profit"], "network_reward": info["network_reward"]}
    out.update({k: kpis[k] for k in KPI_KEYS})
    env.close()
    return out


def mean_ci(values: list[float]) -> dict[str, float | None]:
    """Mean and the half-width of its 95% t-interval (None where undefined)."""
    xs = np.array([v for v in values if v is not None], dtype=np.float64)
    if len(xs) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    if len(xs) == 1:
        return {"mean": float(xs[0]), "ci95": None, "n": 1}
    from scipy.stats import t

    half = float(t.ppf(0.975, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs)))
    return {"mean": round(float(xs.mean()), 6), "ci95": round(half, 6), "n": int(len(xs))}


def _call(job: tuple[str, str, dict[str, Any], int]) -> dict[str, Any]:
    return run_episode(*job)


def evaluate(
    policy_path: str | Path,
    scenario: str | None = None,
    episodes: int = 10,
    policies: tuple[str, ...] = POLICIES,
    n_orders: int | None = None,
    workers: int = 2,
    fleet: str | None = None,
    self_play: bool = False,
) -> dict[str, Any]:
    """Runs every row on the same held-out seeds; returns per-row and paired statistics.

    With `self_play`, the rl row gives the policy to every bidder of the learner's kind
    (as `simulate --policy rl:PATH` does), not only to the learner.
    """
    path = str(policy_path)
    card = read_card(path)
    kw = env_kwargs(card, scenario, n_orders, fleet)
    seeds = held_out_seeds(episodes)
    jobs = [(path, row, {**kw, "peers": f"rl:{path}"} if self_play and row == "rl" else kw, s)
            for row in policies for s in seeds]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_call, jobs))
    else:
        results = [_call(j) for j in jobs]
    by_row: dict[str, list[dict[str, Any]]] = {row: [r for r in results if r["row"] == row] for row in policies}
    metrics = ("learner_reward", "learner_profit", "network_reward", *KPI_KEYS)
    summary = {row: {m: mean_ci([r[m] for r in rs]) for m in metrics} for row, rs in by_row.items()}
    paired: dict[str, Any] = {}
    if "rl" in by_row:
        for base in (b for b in policies if b != "rl"):
            paired[f"rl-{base}"] = {
                m: mean_ci([a[m] - b[m] if a[m] is not None and b[m] is not None else None
                            for a, b in zip(by_row["rl"], by_row[base])])
                for m in ("learner_reward", "cost_per_order", "vip_on_time_rate", "fulfilled_rate")
            }
    return {"policy": path, "env": kw, "reward": kw.get("reward", "profit"), "seeds": seeds, "self_play": self_play,
            "summary": summary, "paired": paired, "episodes": results}


# -- the learning curve ---------------------------------------------------------------
def _monitor_rows(run_dir: Path) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    for f in sorted((run_dir / "monitor").glob("*.monitor.csv")):
        with f.open() as fh:
            fh.readline()  # the JSON header line
            rows += [{k: float(v) for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(fh)]
    rows.sort(key=lambda r: r["t"])
    steps = np.cumsum([r["l"] for r in rows]) if rows else []
    for r, s in zip(rows, steps):
        r["timesteps"] = float(s)
    return rows


def learning_curve(run_dir: str | Path, png: str | Path) -> Path | None:
    """Plots training episodes (learner reward per day) and periodic evaluations to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir, png = Path(run_dir), Path(png)
    card = read_card(run_dir / "policy.zip")
    mode = card.get("reward", "profit")
    key = "learner_profit" if mode == "profit" else "network_reward"
    rows = _monitor_rows(run_dir)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    x = np.array([r["timesteps"] for r in rows])
    y = np.array([r.get(key, np.nan) for r in rows])
    ax.plot(x, y, ".", alpha=0.35, color="tab:blue", label="training episode (one day)")
    if len(y) >= 5:
        k = max(3, len(y) // 10)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1:], smooth, color="tab:blue", label=f"training, rolling mean of {k}")
    npz = run_dir / "eval" / "evaluations.npz"
    if npz.is_file() and mode == "profit":  # network evaluations score the difference reward, not this axis
        ev = np.load(npz)
        ax.errorbar(ev["timesteps"], ev["results"].mean(axis=1) / PROFIT_SCALE, yerr=ev["results"].std(axis=1) / PROFIT_SCALE,
                    fmt="o-", color="tab:orange", label="evaluation (deterministic)")
    base = (((card.get("evaluation") or {}).get("summary") or {}).get("heuristic") or {}).get("learner_reward") or {}
    if base.get("mean") is not None:
        ax.axhline(base["mean"], color="tab:gray", ls="--", label="heuristic bidder (held-out mean)")
    ax.set_xlabel("environment steps (learner bids)")
    ax.set_ylabel("learner profit per day" if mode == "profit" else "network reward per day")
    ax.set_title(f"bidhive {card.get('algo', 'ppo').upper()} on {card.get('scenario', '?')} ({mode} reward)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


def summary_table(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows of 'mean +- ci' strings for printing."""
    def fmt(s: dict[str, Any]) -> str:
        if s.get("mean") is None:
            return "-"
        return f"{s['mean']:.4f}" + (f" ± {s['ci95']:.4f}" if s.get("ci95") is not None else "")

    metrics = ("learner_reward", "learner_profit", "network_reward", *KPI_KEYS)
    return [(m, *(fmt(report["summary"][row][m]) for row in report["summary"])) for m in metrics]


def dumps(report: dict[str, Any]) -> str:
    """Stable JSON."""
    return json.dumps(report, indent=2, sort_keys=True)
