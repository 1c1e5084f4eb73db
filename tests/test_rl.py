"""The learned bidder: the Gymnasium env, the RL policy and the train/evaluate commands."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import envs
from bidhive_cli.output import to_json
from envs.fulfilment import FulfilmentAuctionEnv, base_policy
from market.config import load_fleet, load_scenario
from market.simulator import SimSetup, Simulator
from policies.base import BidContext, BidDecision
from policies.heuristic import LoadMarkup
from policies.registry import NetworkPolicy, make_policy
from policies.rl import OBS_DIM, RLPolicy, decode_action, encode_action, encode_obs

SMALL = {"scenario": "peak", "fleet": "district", "n_orders": 300}
CLI = [sys.executable, "-m", "bidhive_cli.main"]


@pytest.mark.parametrize("env_id", envs.ENV_IDS)
def test_gymnasium_and_sb3_env_checkers_pass(env_id: str) -> None:
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    env = gym.make(env_id, **SMALL)
    check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(gym.make(env_id, **SMALL), warn=True)
    for mode in ("network",):
        check_env(gym.make(env_id, **SMALL, reward=mode, holdback=False).unwrapped, skip_render_check=True)


def _rollout(env: gym.Env, seed: int, steps: int) -> tuple[list[np.ndarray], list[float]]:
    obs, _ = env.reset(seed=seed)
    seen, rewards = [obs], []
    rng = np.random.default_rng(0)
    for _ in range(steps):
        obs, r, term, trunc, _ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        seen.append(obs)
        rewards.append(r)
        if term or trunc:
            break
    return seen, rewards


def test_env_is_deterministic_given_the_seed() -> None:
    a = _rollout(gym.make("bidhive/FulfilmentAuction-v0", **SMALL), 7, 150)
    b = _rollout(gym.make("bidhive/FulfilmentAuction-v0", **SMALL), 7, 150)
    c = _rollout(gym.make("bidhive/FulfilmentAuction-v0", **SMALL), 8, 150)
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]
    assert len(a[1]) > 20 and (a[1] != c[1])


class _FixedLearner:
    """Routes one bidder to a fixed bid and the rest to a base strategy (what the env does)."""

    name = "fixed"

    def __init__(self, learner_id: str, decision: BidDecision, rest: LoadMarkup) -> None:
        self.learner_id, self.decision, self.rest = learner_id, decision, rest

    def decide(self, ctx: BidContext) -> BidDecision:
        return self.decision if ctx.agent_id == self.learner_id else self.rest.decide(ctx)


def test_env_steps_the_real_simulator() -> None:
    """A day stepped through the env ends with the same KPIs, byte for byte, as Simulator.run()."""
    env = FulfilmentAuctionEnv(**SMALL)
    _, info = env.reset(options={"sim_seed": 5})
    action = np.array([-0.5, -1.0], dtype=np.float32)  # markup 1.5, no holdback: exact in float32
    assert decode_action(action) == BidDecision(1.5, 0.0)
    done, final = False, {}
    while not done:
        _, _, done, _, final = env.step(action)
    heuristic = base_policy("heuristic", "first_score")
    policy = NetworkPolicy("x", _FixedLearner(info["learner_id"], BidDecision(1.5, 0.0), LoadMarkup()), heuristic.mechanism)
    sim = Simulator(SimSetup.build(load_scenario("peak"), policy, seed=5, n_orders=300, fleet_cfg=load_fleet("district")))
    sim.run()
    assert to_json(final["kpis"]) == to_json(sim.report(timing=False))
    assert final["learner_bids"] > 0 and final["learner_profit"] > 0


def test_action_and_observation_codecs_round_trip() -> None:
    env = FulfilmentAuctionEnv(**SMALL)
    env.reset(seed=0)
    assert env.context is not None
    obs = encode_obs(env.context)
    assert obs.dtype == np.float32 and obs.shape == (OBS_DIM,) and env.observation_space.contains(obs)
    d = decode_action(encode_action(BidDecision(1.3, 0.2)))
    assert abs(d.markup - 1.3) < 1e-6 and abs(d.holdback - 0.2) < 1e-6


def test_rl_policy_falls_back_to_the_heuristic_when_the_file_is_missing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = FulfilmentAuctionEnv(**SMALL)
    env.reset(seed=0)
    with caplog.at_level(logging.WARNING, logger="bidhive.rl"):
        policy = RLPolicy(tmp_path / "nope.zip")
    assert not policy.loaded
    assert len(caplog.records) == 1 and "heuristic" in caplog.records[0].getMessage()
    assert policy.decide(env.context) == LoadMarkup().decide(env.context)


def test_rl_policy_falls_back_when_the_file_is_incompatible(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from stable_baselines3 import PPO

    other = tmp_path / "pendulum.zip"
    PPO("MlpPolicy", gym.make("Pendulum-v1"), n_steps=64, batch_size=64).save(other)  # obs (3,), action (1,)
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"not a zip at all")
    for path in (other, garbage):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bidhive.rl"):
            policy = RLPolicy(path)
        assert not policy.loaded, path
        assert len(caplog.records) == 1 and "unusable" in caplog.records[0].getMessage()


def test_simulate_with_a_missing_rl_policy_runs_on_the_heuristic(tmp_path: Path) -> None:
    args = ("simulate", "--scenario", "weekday", "--orders", "120", "--seed", "4", "--json", "--no-timing")
    rl = subprocess.run([*CLI, *args, "--policy", f"rl:{tmp_path / 'missing.zip'}"], capture_output=True, text=True, timeout=120)
    heur = subprocess.run([*CLI, *args, "--policy", "heuristic"], capture_output=True, text=True, timeout=120)
    assert rl.returncode == 0, rl.stderr
    assert rl.stdout == heur.stdout
    assert "bidding with the heuristic" in rl.stderr and len(rl.stderr.strip().splitlines()) == 1


def test_train_and_evaluate_smoke(tmp_path: Path) -> None:
    """The real commands: a few hundred steps of PPO, then an evaluation on its output."""
    out = tmp_path / "run"
    train = subprocess.run(
        [*CLI, "train", "--scenario", "peak", "--timesteps", "256", "--out", str(out), "--orders", "300",
         "--n-envs", "1", "--eval-every", "128", "--card-episodes", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    card = json.loads((out / "card.json").read_text())
    assert card["timesteps"] == 256 and card["versions"]["stable-baselines3"]
    assert {"heuristic", "rl"} <= set(card["evaluation"]["summary"])
    assert (out / "policy.zip").is_file() and list((out / "tb").iterdir()) and (out / "learning_curve.png").is_file()
    ev = subprocess.run(
        [*CLI, "evaluate", "--policy", str(out / "policy.zip"), "--episodes", "2", "--rows", "heuristic,rl",
         "--workers", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads(ev.stdout)
    assert report["summary"]["rl"]["learner_reward"]["n"] == 2
    assert report["paired"]["rl-heuristic"]["learner_reward"]["mean"] is not None
    assert min(report["seeds"]) >= 2**30  # held out: training draws seeds below 2**30
    again = subprocess.run([*CLI, "train", "--scenario", "peak", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already holds" in again.stderr


def test_make_policy_rl_prices_the_learned_kind_only(tmp_path: Path) -> None:
    from market.types import Kind
    from policies.rl import ByKind

    pol = make_policy(f"rl:{tmp_path / 'missing.zip'}")
    assert pol.name == "rl" and isinstance(pol.strategy, ByKind) and pol.strategy.kind == Kind.RIDER_POOL


def test_env_draws_its_order_stream_from_a_journal(tmp_path: Path) -> None:
    from envs.fulfilment import orders_from_journal

    journal = tmp_path / "day.bhj"
    sim = subprocess.run([*CLI, "simulate", "--scenario", "peak", "--orders", "150", "--journal", str(journal), "--json",
                          "--no-timing"], capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    orders = orders_from_journal(journal)
    assert len(orders) == 150 and orders == sorted(orders, key=lambda o: o.created_s)
    env = FulfilmentAuctionEnv(scenario="peak", journal=journal, n_orders=100)
    env.reset(seed=0)
    done, info = False, {}
    while not done:
        _, _, done, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
    assert info["kpis"]["orders"] == 100


def test_self_play_peers_bid_with_the_shipped_policy() -> None:
    """With peers=rl:PATH the other rider pool bids with the policy; the learner still follows the env."""
    pretrained = Path(__file__).resolve().parents[1] / "policies" / "pretrained" / "peak" / "policy.zip"
    env = FulfilmentAuctionEnv(**SMALL, peers=f"rl:{pretrained}")
    assert isinstance(env.peers, RLPolicy) and env.peers.loaded
    _, info = env.reset(seed=1)
    done = False
    while not done:
        _, _, done, _, final = env.step(np.array([-1.0, -1.0], dtype=np.float32))
    alone = FulfilmentAuctionEnv(**SMALL)
    alone.reset(seed=1)
    done = False
    while not done:
        _, _, done, _, base = alone.step(np.array([-1.0, -1.0], dtype=np.float32))
    assert final["kpis"]["cost_per_order"] > base["kpis"]["cost_per_order"]  # the peer prices up to 3x cost
