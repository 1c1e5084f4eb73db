"""The learned bidder: an SB3 policy that turns a bidder's `BidContext` into a bid.

The observation and action encodings live here, next to the policy that reads them,
so the Gymnasium env (`envs/fulfilment.py`) and live inference (the simulator, the Ray
bidder actors) can never disagree on them. Everything an observation holds comes from
`BidContext`, which is all a bidder knows when it prices a round.

The SB3 zip is loaded from a path given in config or on the command line, never from
an HTTP request. torch is imported only when a policy is loaded, with one thread. A
missing or incompatible file (wrong observation or action space, not an SB3 zip) is
not fatal: the bidder falls back to the heuristic `LoadMarkup` with one warning line.
"""
from __future__ import annotations

import json
import logging
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from market.types import Kind
from policies.base import BidContext, BidDecision, BiddingStrategy
from policies.heuristic import LoadMarkup

log = logging.getLogger("bidhive.rl")

OBS_NAMES: tuple[str, ...] = (
    "load",  # share of own capacity in use
    "hour_sin",
    "hour_cos",  # time of day on the unit circle
    "round_size",  # orders in the round / 64
    "round_vip_share",
    "win_rate",  # EWMA share of held capacity that won
    "reliability",  # own on-time estimate
    "market_load",  # share of the round's orders that are retries: a competitor load index
    "recent_price",  # EWMA of own payment per award / 20
    "capacity",  # own capacity / 500: lets one policy serve bidders of different sizes
)
OBS_DIM = len(OBS_NAMES)
OBS_LOW = np.array([0.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)
OBS_HIGH = np.ones(OBS_DIM, dtype=np.float32)

CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoint zips (`policies.train`)
MARKUP_RANGE = (1.0, 3.0)  # a learned bidder never sells below cost; 3.0 is policies.base.MAX_MARKUP
HOLDBACK_MAX = 0.5
ROUND_SIZE_SCALE = 64.0
PRICE_SCALE = 20.0
CAPACITY_SCALE = 500.0


def encode_obs(ctx: BidContext) -> np.ndarray:
    """The float32 observation for one bidder and round (bounds: OBS_LOW..OBS_HIGH)."""
    angle = 2.0 * math.pi * ctx.hour_of_day / 24.0
    obs = np.array(
        [
            ctx.load,
            math.sin(angle),
            math.cos(angle),
            ctx.round_size / ROUND_SIZE_SCALE,
            ctx.round_vip_share,
            ctx.win_rate,
            ctx.reliability,
            ctx.market_load,
            ctx.recent_price / PRICE_SCALE,
            ctx.capacity_total / CAPACITY_SCALE,
        ],
        dtype=np.float32,
    )
    return np.clip(obs, OBS_LOW, OBS_HIGH)


def action_dim(holdback: bool) -> int:
    """1 (markup) or 2 (markup, VIP holdback share)."""
    return 2 if holdback else 1


def decode_action(action: np.ndarray) -> BidDecision:
    """Maps a normalized action in [-1, 1]^d to a bid.

    a[0] -> markup on cost in MARKUP_RANGE (linear; 0 is 2.0x), a[1] (optional) ->
    share of capacity kept back for VIP orders in [0, HOLDBACK_MAX].
    """
    a = np.clip(np.asarray(action, dtype=np.float64).reshape(-1), -1.0, 1.0)
    lo, hi = MARKUP_RANGE
    markup = lo + (a[0] + 1.0) * 0.5 * (hi - lo)
    holdback = (a[1] + 1.0) * 0.5 * HOLDBACK_MAX if len(a) > 1 else 0.0
    return BidDecision(markup=float(markup), holdback=float(holdback))


def encode_action(decision: BidDecision, holdback: bool = True) -> np.ndarray:
    """The inverse of `decode_action` (clipped), e.g. to express a baseline's bid as an action."""
    lo, hi = MARKUP_RANGE
    a0 = 2.0 * (decision.markup - lo) / (hi - lo) - 1.0
    parts = [a0, 2.0 * decision.holdback / HOLDBACK_MAX - 1.0] if holdback else [a0]
    return np.clip(np.array(parts, dtype=np.float32), -1.0, 1.0)


def read_card(policy_path: str | Path) -> dict[str, Any]:
    """The `card.json` of a policy zip: beside it, or for a checkpoint of a run
    (``OUT/checkpoints/*.zip``, as `bidhive train` writes them) the run's own; {} when
    there is none, or it is unreadable or not a JSON object. No other folder's card is
    taken: it would describe another policy."""
    here = Path(policy_path).parent
    card = here / "card.json"
    if not card.exists() and here.name == CHECKPOINTS:
        card = here.parent / "card.json"
    try:
        found = json.loads(card.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _check_card(card: dict[str, Any]) -> None:
    """A card whose kind or algorithm bidhive does not know cannot say how to use the policy."""
    kind, algo = card.get("kind"), card.get("algo")
    if kind is not None and kind not in {k.value for k in Kind}:
        raise IncompatiblePolicy(f"its card.json names an unknown kind {kind!r}")
    if algo is not None and not isinstance(algo, str):
        raise IncompatiblePolicy(f"its card.json names the algorithm as {algo!r}")


class IncompatiblePolicy(ValueError):
    """A policy file that cannot drive this bidder (spaces, format)."""


def _load_model(path: Path, algo: str | None) -> Any:
    """Loads an SB3 PPO or SAC zip on the CPU, with torch limited to one thread."""
    import torch  # lazy: ~1.7 s, and only bidders that use a learned policy pay it

    torch.set_num_threads(1)
    from stable_baselines3 import PPO, SAC

    if not zipfile.is_zipfile(path):
        raise IncompatiblePolicy("not an SB3 zip")
    classes = {"ppo": PPO, "sac": SAC}
    order = sorted(classes.values(), key=lambda cls: cls is not classes.get(algo or ""))  # the card's first
    errors = []
    for cls in order:
        try:
            return cls.load(path, device="cpu")
        except Exception as err:  # SB3 raises many types for a zip of the other algorithm
            errors.append(f"{cls.__name__}: {type(err).__name__}")
    raise IncompatiblePolicy("cannot load as " + ", ".join(errors))


@dataclass
class RLPolicy:
    """A bidding strategy backed by a trained SB3 policy (deterministic actions).

    Args:
        path: the policy zip (`model.save`); config or CLI only.
        fallback: the strategy used when the file is missing or incompatible.
    """

    path: str | Path
    fallback: BiddingStrategy = field(default_factory=LoadMarkup)
    name: str = "rl"

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.card = read_card(self.path)
        self.model: Any = None
        self.fallback_reason: str | None = None
        try:
            if not self.path.is_file():
                raise FileNotFoundError("file not found")
            _check_card(self.card)
            model = _load_model(self.path, self.card.get("algo"))
            obs_shape = getattr(model.observation_space, "shape", None)
            act_shape = getattr(model.action_space, "shape", None)
            if obs_shape != (OBS_DIM,) or act_shape not in ((1,), (2,)):
                raise IncompatiblePolicy(
                    f"observation {obs_shape} / action {act_shape}, expected ({OBS_DIM},) / (1,) or (2,)"
                )
        except (OSError, IncompatiblePolicy) as err:
            self.fallback_reason = str(err)
            log.warning("rl policy %s unusable (%s): bidding with the heuristic instead", self.path, err)
            return
        import torch

        self.model = model
        self._torch = torch
        self._policy = model.policy
        self._policy.set_training_mode(False)

    @property
    def loaded(self) -> bool:
        """True when decisions come from the learned policy, False when from the fallback."""
        return self.model is not None

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The deterministic normalized action for one observation."""
        with self._torch.inference_mode():
            out = self._policy._predict(self._torch.from_numpy(obs).reshape(1, -1), deterministic=True)
        return out.numpy().reshape(-1)

    def decide(self, ctx: BidContext) -> BidDecision:
        """The learned bid for this round (or the fallback's when no policy loaded)."""
        if self.model is None:
            return self.fallback.decide(ctx)
        return decode_action(self.act(encode_obs(ctx)))


@dataclass(frozen=True)
class ByKind:
    """One strategy for bidders of one kind, another for the rest.

    Dispatches on the context, so the same object works in the simulator and inside
    a Ray bidder actor (which is handed the network policy's strategy).
    """

    kind: Kind
    learned: BiddingStrategy
    rest: BiddingStrategy
    name: str = "rl"

    def decide(self, ctx: BidContext) -> BidDecision:
        """The learned bid for the chosen kind, the other strategy otherwise."""
        return (self.learned if ctx.kind == self.kind else self.rest).decide(ctx)


def rl_strategy(path: str | Path, kind: str | None = None) -> ByKind:
    """RL for every bidder of the policy's kind (from its card, else rider pools), heuristic for the rest."""
    policy = RLPolicy(path)
    named = policy.card.get("kind") if policy.loaded else None  # a card that failed its check names nothing
    chosen = Kind(kind or named or Kind.RIDER_POOL.value)
    return ByKind(chosen, policy, LoadMarkup())
