"""The learned bidder's hot paths: env steps/s, training wall time, inference per decision.

- env steps/s on one process (the default training env: district fleet, peak profile,
  4,300 orders; and the city fleet for comparison), then vectorized with SB3's
  DummyVecEnv and SubprocVecEnv (2 envs). The machine is shared, so each figure carries
  the load average around it, and single-process figures also count steps per second
  of the process's own CPU time, which other jobs disturb less than wall time;
- the default training run's wall time, read from the shipped policy's card.json
  (measured when it was trained; `--quick` times a tiny training run instead);
- RL inference per decision (`RLPolicy.decide`: encode, torch forward, decode), which is
  one call per round per bidder actor.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import machine, percentiles_ms

PRETRAINED = Path(__file__).resolve().parents[1] / "policies" / "pretrained" / "peak"
TRAIN_KW = {"scenario": "peak", "fleet": "district", "n_orders": 4300}
CITY_KW = {"scenario": "peak", "fleet": None, "n_orders": 30000}
TARGET_STEPS_PER_S = 5000
TARGET_INFERENCE_MS = 1.0


def _loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def _env_steps(kw: dict[str, Any], steps: int, seed: int = 0) -> dict[str, Any]:
    """Steps one env with a fixed mid-range action; resets at the end of a day (resets are counted)."""
    from envs.fulfilment import FulfilmentAuctionEnv

    env = FulfilmentAuctionEnv(**kw)
    env.reset(seed=seed)
    action = np.zeros(env.action_space.shape, dtype=np.float32)
    rounds0 = env.sim.engine.kpis.rounds if env.sim else 0
    rounds, done_steps = 0, 0
    load = _loadavg()
    t0, cpu0 = time.perf_counter(), time.process_time()
    while done_steps < steps:
        _, _, term, trunc, _ = env.step(action)
        done_steps += 1
        if term or trunc:
            rounds += env.sim.engine.kpis.rounds - rounds0 if env.sim else 0
            env.reset()
            rounds0 = env.sim.engine.kpis.rounds if env.sim else 0
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    rounds += (env.sim.engine.kpis.rounds - rounds0) if env.sim else 0
    env.close()
    return {"env": {k: v for k, v in kw.items()}, "steps": steps, "wall_s": round(wall, 3),
            "steps_per_s": round(steps / wall, 1), "cpu_steps_per_s": round(steps / cpu, 1),
            "rounds_per_step": round(rounds / steps, 2), "ms_per_round": round(wall * 1000.0 / max(1, rounds), 4),
            "loadavg": [load, _loadavg()]}


def _vec_steps(kind: str, n_envs: int, steps: int) -> dict[str, Any]:
    """Total env steps/s of an SB3 vectorized env (steps counted over all envs)."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    def make(rank: int):  # type: ignore[no-untyped-def]
        def thunk() -> gym.Env:
            import envs  # noqa: F401

            return gym.make("bidhive/FulfilmentAuction-v0", **TRAIN_KW)
        return thunk

    cls = SubprocVecEnv if kind == "subproc" else DummyVecEnv
    venv = cls([make(i) for i in range(n_envs)])
    venv.seed(0)
    venv.reset()
    actions = np.zeros((n_envs, *venv.action_space.shape), dtype=np.float32)
    load = _loadavg()
    t0 = time.perf_counter()
    for _ in range(steps // n_envs):
        venv.step(actions)
    wall = time.perf_counter() - t0
    venv.close()
    return {"vec": kind, "n_envs": n_envs, "steps": steps, "wall_s": round(wall, 3),
            "steps_per_s": round(steps / wall, 1), "loadavg": [load, _loadavg()]}


def _inference(policy_path: Path, calls: int) -> dict[str, Any]:
    """Wall time of `RLPolicy.decide` on contexts from a real day."""
    from envs.fulfilment import FulfilmentAuctionEnv
    from policies.rl import RLPolicy

    env = FulfilmentAuctionEnv(**{**TRAIN_KW, "n_orders": 1500})
    env.reset(seed=1)
    contexts = []
    for _ in range(200):
        contexts.append(env.context)
        _, _, done, _, _ = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
        if done:
            break
    t0 = time.perf_counter()
    policy = RLPolicy(policy_path)
    load_s = time.perf_counter() - t0
    samples = []
    for i in range(calls):
        ctx = contexts[i % len(contexts)]
        t = time.perf_counter()
        policy.decide(ctx)
        samples.append(time.perf_counter() - t)
    return {"policy": str(policy_path), "loaded": policy.loaded, "load_s": round(load_s, 3), "calls": calls,
            **percentiles_ms(samples), "target_ms": TARGET_INFERENCE_MS}


def _training(quick: bool) -> dict[str, Any]:
    """The default run's measured wall time (card.json); a tiny timed run when quick."""
    card_path = PRETRAINED / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    out: dict[str, Any] = {
        "default_run": {k: card.get(k) for k in ("timesteps", "learn_wall_s", "wall_s", "steps_per_s", "algo")},
        "command": card.get("command"), "target_wall_s": 900,
    }
    if quick:
        import tempfile

        from policies.train import TrainArgs, train

        with tempfile.TemporaryDirectory() as tmp:
            args = TrainArgs(timesteps=512, out=tmp, n_orders=600, n_envs=1, vec="dummy", eval_every=10_000,
                             card_episodes=0, progress=False)
            t0 = time.perf_counter()
            train(args)
            out["quick_run"] = {"timesteps": 512, "wall_s": round(time.perf_counter() - t0, 2)}
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """All figures as one JSON-ready dict."""
    steps = 500 if quick else 5000
    single = [_env_steps(TRAIN_KW, steps)]
    if not quick:
        single.append(_env_steps(CITY_KW, 1000))
    vec = [_vec_steps("dummy", 2, steps), _vec_steps("subproc", 2, steps)]
    policy = PRETRAINED / "policy.zip"
    return {
        "benchmark": "rl", "machine": machine(),
        "env_single": single, "env_vectorized": vec, "target_steps_per_s": TARGET_STEPS_PER_S,
        "training": _training(quick),
        "inference": _inference(policy, 500 if quick else 5000),
    }
