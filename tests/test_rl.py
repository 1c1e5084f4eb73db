"""The learned bidder: the Gymnasium env, the RL policy and the train/evaluate commands."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

import envs
from bidhive_cli.output import to_json
from agents.fleet import build_fleet
from envs.fulfilment import FulfilmentAuctionEnv, base_policy
from market.config import ProfileCfg, load_fleet, load_scenario
from market.demand import generate_orders
from market.round import build_round
from market.simulator import PendingRound, SimSetup, Simulator
from policies.base import BidContext, BidDecision
from policies.heuristic import LoadMarkup
from policies.registry import NetworkPolicy, make_policy
from policies.rl import OBS_DIM, RLPolicy, decode_action, encode_action, encode_obs, read_card

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


MARKUP_1_5 = np.array([-0.5, -1.0], dtype=np.float32)  # markup 1.5, no holdback: exact in float32


def _day(env: FulfilmentAuctionEnv, sim_seed: int) -> tuple[list[np.ndarray], list[float], dict[str, Any]]:
    """Observations, rewards and final info of one day bid at a fixed markup of 1.5."""
    obs, _ = env.reset(options={"sim_seed": sim_seed})
    seen, rewards, done, final = [obs], [], False, {}
    while not done:
        obs, r, done, _, final = env.step(MARKUP_1_5)
        seen.append(obs)
        rewards.append(r)
    return seen, rewards, final


def _reference_sim(learner_id: str, sim_seed: int) -> Simulator:
    """The day `_day` steps through on SMALL, built as a plain Simulator with the learner's bid fixed."""
    learner = _FixedLearner(learner_id, decode_action(MARKUP_1_5), LoadMarkup())
    policy = NetworkPolicy("x", learner, base_policy("heuristic", "first_score").mechanism)
    return Simulator(SimSetup.build(load_scenario("peak"), policy, seed=sim_seed, n_orders=300,
                                    fleet_cfg=load_fleet("district")))


def test_env_steps_the_real_simulator() -> None:
    """A day stepped through the env ends with the same KPIs, byte for byte, as Simulator.run()."""
    assert decode_action(MARKUP_1_5) == BidDecision(1.5, 0.0)
    env = FulfilmentAuctionEnv(**SMALL, exact_every=None)  # the scenario's exact sampling, as Simulator.run()
    _, _, final = _day(env, 5)
    sim = _reference_sim(env.learner_id, 5)
    sim.run()
    assert to_json(final["kpis"]) == to_json(sim.report(timing=False))
    assert final["learner_bids"] > 0 and final["learner_profit"] > 0


def test_exact_sampling_is_off_by_default_and_changes_nothing_else() -> None:
    """Training skips the efficiency_vs_exact samples (~2 ms each); the day itself is the same."""
    obs, rewards, final = _day(FulfilmentAuctionEnv(**SMALL), 5)
    obs_x, rewards_x, final_x = _day(FulfilmentAuctionEnv(**SMALL, exact_every=None), 5)
    assert final["kpis"]["efficiency_vs_exact"] is None and final_x["kpis"]["efficiency_vs_exact"] is not None
    assert all(np.array_equal(a, b) for a, b in zip(obs, obs_x)) and rewards == rewards_x
    assert {**final["kpis"], "efficiency_vs_exact": None} == {**final_x["kpis"], "efficiency_vs_exact": None}
    assert {k: v for k, v in final.items() if k != "kpis"} == {k: v for k, v in final_x.items() if k != "kpis"}


def _fleet_cost(pending: PendingRound, profile: ProfileCfg, max_attempts: int) -> float:
    """What one traded round cost the retailer: payments, lateness and the penalty of orders given up."""
    out = pending.outcome
    assert out is not None
    rnd, alloc, cost = out.rnd, out.alloc, 0.0
    for o, reason in enumerate(out.alloc.reason):
        vip = bool(rnd.vip[o])
        if not reason:
            cost += float(alloc.src_payment[o] + alloc.leg_payment[o])
            if out.delivered_s[o] > rnd.promise_s[o]:
                cost += profile.lateness_penalty * (profile.vip_lateness_multiplier if vip else 1.0)
        elif pending.batch[o][1] + 1 >= max_attempts:
            cost += profile.vip_unfulfilled_penalty if vip else profile.unfulfilled_penalty
    return cost


def test_network_reward_is_the_fleet_cost_of_the_day() -> None:
    """The day's network reward, read from the KPI counters, is the sum of every round's fleet cost."""
    env = FulfilmentAuctionEnv(**SMALL)
    _, _, final = _day(env, 5)
    total, last = 0.0, None
    for pending in _reference_sim(env.learner_id, 5).rounds():
        if last is not None:
            total += _fleet_cost(last, env.profile, env.scenario.round.max_attempts)
        last = pending
    assert last is not None
    total += _fleet_cost(last, env.profile, env.scenario.round.max_attempts)
    assert final["network_reward"] == pytest.approx(-total, rel=1e-12)


def test_a_look_at_the_round_is_reused_by_the_quote_that_follows() -> None:
    """`bid_context` (the env's look before the bidders are asked) costs the round nothing extra."""
    fleet_cfg = load_fleet("district")
    looked, fresh = (build_fleet(fleet_cfg, 3).by_id()["riders-a"] for _ in range(2))
    f = build_fleet(fleet_cfg, 3)
    orders = generate_orders(load_scenario("peak"), fleet_cfg, f.env.catalogue, 400, 3)[200:240]
    now = max(o.created_s for o in orders)
    rnd, other = (build_round(k, now, orders, f.sources, f.env.grid, f.env.catalogue.index) for k in (1, 2))
    calls = []
    prepare = looked._prepare
    looked._prepare = lambda r, t: calls.append(r.round_id) or prepare(r, t)  # type: ignore[method-assign]
    assert looked.bid_context(rnd, now) is not None
    q, q_fresh = looked.quote(rnd, now, LoadMarkup(), 5.0), fresh.quote(rnd, now, LoadMarkup(), 5.0)
    assert calls == [1] and q is not None and q_fresh is not None
    fields = ("order_idx", "source_idx", "price", "pickup_s")
    assert all(np.array_equal(getattr(q, k), getattr(q_fresh, k)) for k in fields)
    looked.bid_context(other, now)
    looked.release(2, now)  # any other protocol call drops the look: the next quote prepares afresh
    looked.quote(other, now, LoadMarkup(), 5.0)
    assert calls == [1, 2, 2]


def test_action_and_observation_codecs_round_trip() -> None:
    env = FulfilmentAuctionEnv(**SMALL)
    env.reset(seed=0)
    assert env.context is not None
    obs = encode_obs(env.context)
    assert obs.dtype == np.float32 and obs.shape == (OBS_DIM,) and env.observation_space.contains(obs)
    d = decode_action(encode_action(BidDecision(1.3, 0.2)))
    assert abs(d.markup - 1.3) < 1e-6 and abs(d.holdback - 0.2) < 1e-6


def test_a_day_the_learner_never_bids_in_resets_to_the_same_observation_whatever_ran_before() -> None:
    """A one-order day may pass without the learner: reset must not show the last day's state."""
    env = FulfilmentAuctionEnv(scenario="peak", fleet="district", n_orders=1)
    seen = {}
    for sim_seed in range(12):
        obs, _ = env.reset(options={"sim_seed": sim_seed})
        fresh, _ = FulfilmentAuctionEnv(scenario="peak", fleet="district", n_orders=1).reset(
            options={"sim_seed": sim_seed})
        assert np.array_equal(obs, fresh), sim_seed
        seen[sim_seed] = env.context is None
    assert any(seen.values()) and not all(seen.values()), seen  # both kinds of day were met


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


@pytest.mark.parametrize("card, usable", [('[1, 2]', True), ('null', True), ('{"kind": "rider-pool"}', False),
                                          ('{"algo": 3}', False)])
def test_a_card_that_is_not_one_is_none_and_one_naming_the_unknown_falls_back(tmp_path: Path, card: str,
                                                                                usable: bool) -> None:
    """The zip itself loads. A card.json that is no JSON object is no card (the zip loads as
    one without a card does); one that names a kind or algorithm bidhive does not know
    cannot say how to use the policy, so the bidders stay on the heuristic, with one line.
    Neither takes `simulate` down."""
    from stable_baselines3 import PPO

    zipped = tmp_path / "policy.zip"
    PPO("MlpPolicy", FulfilmentAuctionEnv(**SMALL), n_steps=64, batch_size=64).save(zipped)
    (tmp_path / "card.json").write_text(card)
    assert RLPolicy(zipped).loaded == usable
    args = ("simulate", "--scenario", "weekday", "--orders", "60", "--seed", "4", "--json", "--no-timing")
    rl = subprocess.run([*CLI, *args, "--policy", f"rl:{zipped}"], capture_output=True, text=True, timeout=120)
    assert rl.returncode == 0 and "Traceback" not in rl.stderr, rl.stderr
    if not usable:
        heur = subprocess.run([*CLI, *args, "--policy", "heuristic"], capture_output=True, text=True, timeout=120)
        assert rl.stdout == heur.stdout and "bidding with the heuristic" in rl.stderr, rl.stderr
        assert len(rl.stderr.strip().splitlines()) == 1


def test_a_card_is_the_policys_own_or_its_runs_for_a_checkpoint(tmp_path: Path) -> None:
    """Another folder's card would describe another policy (its kind, env, journal)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "other").mkdir()
    (run / "card.json").write_text(json.dumps({"kind": "crowd"}))
    assert read_card(run / "policy.zip") == {"kind": "crowd"}
    assert read_card(run / "checkpoints" / "policy_128_steps.zip") == {"kind": "crowd"}
    assert read_card(run / "other" / "policy.zip") == {}
    (run / "checkpoints" / "card.json").write_text("{not json")
    assert read_card(run / "checkpoints" / "policy_128_steps.zip") == {}  # its own card, unreadable: none


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
    from stable_baselines3 import PPO

    assert card["timesteps"] == PPO.load(out / "policy.zip").num_timesteps and card["timesteps_requested"] == 256
    assert card["versions"]["stable-baselines3"]
    checkpoints = sorted((out / "checkpoints").glob("*.zip"))
    assert checkpoints and all(read_card(c) == card for c in checkpoints)  # a checkpoint finds its run's card
    assert {"heuristic", "rl"} <= set(card["evaluation"]["summary"])
    assert (out / "policy.zip").is_file() and list((out / "tb").iterdir()) and (out / "learning_curve.png").is_file()
    drawn = (out / "learning_curve.png").stat().st_mtime_ns
    ev = subprocess.run(
        [*CLI, "evaluate", "--policy", str(out / "policy.zip"), "--episodes", "2", "--rows", "heuristic,rl,heuristic",
         "--workers", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads(ev.stdout)
    assert report["summary"]["rl"]["learner_reward"]["n"] == report["summary"]["heuristic"]["learner_reward"]["n"] == 2
    assert report["paired"]["rl-heuristic"]["learner_reward"]["mean"] is not None
    assert min(report["seeds"]) >= 2**30  # held out: training draws seeds below 2**30
    assert report["learning_curve"] == str(out / "learning_curve.png")  # train's curve, not drawn again
    assert (out / "learning_curve.png").stat().st_mtime_ns == drawn
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


def test_train_from_a_journal_and_evaluate_on_its_demand(tmp_path: Path) -> None:
    """`bidhive train --journal`: every day replays the journal's orders, all of them by
    default; the card names the journal, so `evaluate` replays the same demand."""
    journal, out = tmp_path / "day.bhj", tmp_path / "run"
    sim = subprocess.run([*CLI, "simulate", "--scenario", "peak", "--orders", "200", "--journal", str(journal),
                          "--json", "--no-timing"], capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    train = subprocess.run([*CLI, "train", "--scenario", "peak", "--journal", str(journal), "--timesteps", "128",
                            "--out", str(out), "--n-envs", "1", "--eval-every", "128", "--card-episodes", "1",
                            "--no-progress"], capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    card = json.loads((out / "card.json").read_text())
    assert card["env"]["journal"] == str(journal.resolve()) and card["env"]["n_orders"] is None
    ev = subprocess.run([*CLI, "evaluate", "--policy", str(out / "policy.zip"), "--episodes", "1", "--rows", "rl",
                         "--workers", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads(ev.stdout)["env"]["journal"] == str(journal.resolve())
    journal.unlink()
    gone = subprocess.run([*CLI, "evaluate", "--policy", str(out / "policy.zip"), "--episodes", "1"],
                          capture_output=True, text=True, timeout=120)
    assert gone.returncode == 2 and "which is not there now" in gone.stderr, gone.stderr


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
