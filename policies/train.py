"""Train a learned bidder with Stable-Baselines3: read it top to bottom (CleanRL style).

    bidhive train --scenario peak --out runs/peak --seed 0   # 40,000 steps by default

1. Seed everything from `--seed`.
2. Build the vectorized training envs (`bidhive/FulfilmentAuction-v0`, each wrapped in
   a `Monitor` that writes `monitor/*.monitor.csv`) and one evaluation env.
3. Build PPO (default) or SAC with a small MLP and a TensorBoard logger whose tags
   follow a fixed scheme: `charts/...` (episode returns, lengths, steps/s),
   `losses/...` (every training loss SB3 reports), `eval/...` (periodic evaluation).
4. Learn with a progress bar, a checkpoint callback and an evaluation callback.
5. Save `policy.zip`, evaluate it against the heuristic bidder on held-out seeds and
   write `card.json` (scenario, seed, timesteps, env settings, evaluation KPIs,
   package versions, wall time) and `learning_curve.png`.

torch is imported here (training needs it) but never by the market core.
"""
from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

from policies.rl import CHECKPOINTS


DEFAULT_FLEET = "district"  # 9 bidders, ~1/7 of the city's last-mile capacity (configs/fleets/district.yaml)
DEFAULT_ORDERS = 4300  # a peak-profile day as capacity-bound for the district as 30,000 are for the city
SEED_STRIDE = 1000  # env i of a run with seed S is seeded S * SEED_STRIDE + i


@dataclass
class TrainArgs:
    """Everything a training run is made of (written to card.json)."""

    scenario: str = "peak"
    timesteps: int = 40_000
    out: str = "runs/peak"
    seed: int = 0
    algo: Literal["ppo", "sac"] = "ppo"
    reward: Literal["profit", "network"] = "profit"
    kind: str = "rider_pool"
    fleet: str | None = DEFAULT_FLEET
    n_orders: int | None = DEFAULT_ORDERS
    others: str = "heuristic"
    peers: str | None = None  # rl:PATH: the learner's own kind bids with a frozen earlier policy (self-play)
    journal: str | None = None  # a journal whose orders are every training day's demand (trace-driven)
    holdback: bool = True
    n_envs: int = 2
    vec: Literal["dummy", "subproc"] = "subproc"
    eval_every: int = 20_000  # timesteps between evaluations (and checkpoints)
    eval_episodes: int = 2
    card_episodes: int = 3  # held-out episodes summarised in card.json
    progress: bool = True
    net_arch: list[int] = field(default_factory=lambda: [64, 64])

    def env_kwargs(self) -> dict[str, Any]:
        """Arguments of `bidhive/FulfilmentAuction-v0` for this run."""
        kw = {"scenario": self.scenario, "n_orders": self.n_orders, "fleet": self.fleet, "kind": self.kind,
              "reward": self.reward, "others": self.others, "holdback": self.holdback}
        extra = {"peers": self.peers, "journal": self.journal}
        return {**kw, **{k: v for k, v in extra.items() if v}}


def package_versions() -> dict[str, str]:
    """Versions that decide whether a policy zip loads and behaves the same."""
    names = ("stable-baselines3", "torch", "gymnasium", "numpy", "bidhive")
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except Exception:  # a package missing from metadata is reported, not fatal
            out[name] = "unknown"
    return out


def tagged_logger(folder: Path) -> Any:
    """An SB3 logger writing TensorBoard (and CSV) with the fixed tag scheme.

    SB3 reports `train/*` (losses, entropy, kl...), `rollout/*` and `time/*`; they are
    renamed to `losses/*` and `charts/*`, and `eval/*` stays as it is.
    """
    from stable_baselines3.common.logger import CSVOutputFormat, KVWriter, Logger, TensorBoardOutputFormat

    def tag(key: str) -> str:
        head, _, tail = key.partition("/")
        if head == "train":
            return f"losses/{tail}"
        if head in ("rollout", "time"):
            return f"charts/{tail}"
        return key

    class Tagged(KVWriter):
        """Renames keys to the fixed scheme before handing them to the real writer."""

        def __init__(self, inner: KVWriter) -> None:
            self.inner = inner

        def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
            self.inner.write({tag(k): v for k, v in key_values.items()},
                             {tag(k): v for k, v in key_excluded.items()}, step)

        def close(self) -> None:
            self.inner.close()

    folder.mkdir(parents=True, exist_ok=True)
    formats = [Tagged(TensorBoardOutputFormat(str(folder / "tb"))), Tagged(CSVOutputFormat(str(folder / "progress.csv")))]
    return Logger(str(folder), formats)


def make_callbacks(args: TrainArgs, out: Path, eval_env: Any) -> list[Any]:
    """Checkpoints, periodic evaluation (eval/*) and per-episode charts (charts/*)."""
    from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback

    class Charts(BaseCallback):
        """Logs each finished episode's return, length and the learner's unscaled totals."""

        def _on_step(self) -> bool:
            for info in self.locals.get("infos", []):
                ep = info.get("episode")
                if ep:
                    self.logger.record_mean("charts/episodic_return", ep["r"])
                    self.logger.record_mean("charts/episodic_length", ep["l"])
                if "learner_profit" in info:
                    self.logger.record_mean("charts/learner_profit", info["learner_profit"])
                    self.logger.record_mean("charts/network_reward", info["network_reward"])
                    self.logger.record_mean("charts/cost_per_order", info["kpis"]["cost_per_order"] or 0.0)
            return True

    every = max(1, args.eval_every // args.n_envs)
    return [
        Charts(),
        CheckpointCallback(save_freq=every, save_path=str(out / CHECKPOINTS), name_prefix="policy"),
        EvalCallback(eval_env, n_eval_episodes=args.eval_episodes, eval_freq=every, log_path=str(out / "eval"),
                     best_model_save_path=None, deterministic=True, verbose=0),
    ]


def train(args: TrainArgs) -> dict[str, Any]:
    """Runs one training and returns its card (also written to OUT/card.json)."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.utils import set_random_seed
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    import envs  # noqa: F401  (registers bidhive/FulfilmentAuction-v0)

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. seeding: python, numpy and torch; every env gets a seed derived from the run's
    torch.set_num_threads(1)
    set_random_seed(args.seed)

    # 2. envs
    kwargs = args.env_kwargs()
    (out / "monitor").mkdir(exist_ok=True)

    def make(rank: int):  # type: ignore[no-untyped-def]
        def thunk() -> gym.Env:
            import envs  # noqa: F401  (a SubprocVecEnv worker registers the id itself)

            env = gym.make("bidhive/FulfilmentAuction-v0", **kwargs)
            env = Monitor(env, str(out / "monitor" / f"env{rank}"), info_keywords=("learner_profit", "network_reward"))
            env.reset(seed=args.seed * SEED_STRIDE + rank)
            env.action_space.seed(args.seed * SEED_STRIDE + rank)
            return env
        return thunk

    vec_cls = SubprocVecEnv if args.vec == "subproc" and args.n_envs > 1 else DummyVecEnv
    venv = vec_cls([make(i) for i in range(args.n_envs)])
    venv.seed(args.seed * SEED_STRIDE)
    eval_env = Monitor(gym.make("bidhive/FulfilmentAuction-v0", **kwargs))
    eval_env.reset(seed=args.seed * SEED_STRIDE + 999)

    # 3. model
    policy_kwargs = {"net_arch": list(args.net_arch)}
    n_steps = max(64, min(1024, args.timesteps // args.n_envs))  # a smoke run of a few hundred steps stays that short
    if args.algo == "ppo":
        model = PPO("MlpPolicy", venv, seed=args.seed, device="cpu", learning_rate=3e-4,
                    n_steps=n_steps, batch_size=min(256, n_steps * args.n_envs), n_epochs=5, gamma=0.9, gae_lambda=0.9,
                    ent_coef=0.0, policy_kwargs=policy_kwargs, verbose=0)
    elif args.algo == "sac":
        model = SAC("MlpPolicy", venv, seed=args.seed, device="cpu", learning_rate=3e-4,
                    buffer_size=200_000, learning_starts=2_000, batch_size=256, gamma=0.9,
                    train_freq=4, gradient_steps=1, policy_kwargs=policy_kwargs, verbose=0)
    else:
        raise ValueError(f"unknown algorithm '{args.algo}' (known: ppo, sac)")
    model.set_logger(tagged_logger(out))

    # 4. learn
    callbacks = make_callbacks(args, out, eval_env)
    learn_start = time.perf_counter()
    with warnings.catch_warnings():  # the eval env is a DummyVecEnv by design
        warnings.filterwarnings("ignore", message="Training and eval env are not of the same type")
        model.learn(total_timesteps=args.timesteps, callback=callbacks, progress_bar=args.progress)
    learn_s = time.perf_counter() - learn_start
    venv.close()

    # 5. save, evaluate on held-out seeds, write the card and the learning curve
    model.save(out / "policy.zip")
    from envs.evaluation import evaluate, learning_curve

    card: dict[str, Any] = {
        "algo": args.algo, "scenario": args.scenario, "seed": args.seed, "timesteps": model.num_timesteps,
        "timesteps_requested": args.timesteps,  # PPO trains whole rollouts: n_steps x n_envs each
        "kind": args.kind, "reward": args.reward, "env": {**kwargs, "learner_id": eval_env.unwrapped.learner_id},
        "args": asdict(args), "versions": package_versions(),
        "learn_wall_s": round(learn_s, 1), "steps_per_s": round(model.num_timesteps / learn_s, 1),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    if args.card_episodes > 0:
        report = evaluate(out / "policy.zip", episodes=args.card_episodes, policies=("heuristic", "rl"), workers=1)
        card["evaluation"] = report
    card["wall_s"] = round(time.perf_counter() - started, 1)
    (out / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    learning_curve(out, out / "learning_curve.png")
    eval_env.close()
    return card
