"""Typed configuration: fleet, strategy profiles and scenarios, loaded from YAML.

Pydantic models give every bad value a precise location, which `ConfigError` turns
into the one-line message a user sees: file, key, what is wrong.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from market.types import Category, Tier

CONFIG_DIR = Path(os.environ.get("BIDHIVE_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be used; the message is one readable line."""


class Strict(BaseModel):
    """Base model: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Finite(Strict):
    """Base of the market configs: NaN and infinity are errors, since numpy would spread them, not fail."""

    model_config = ConfigDict(allow_inf_nan=False)


Weight = Annotated[float, Field(ge=0)]
W = TypeVar("W", dict[Any, float], tuple[float, ...])


def _some_weight(weights: W) -> W:
    """Weights are divided by their sum before `rng.choice`, so it must be positive and finite."""
    total = sum(weights.values() if isinstance(weights, dict) else weights)
    if total <= 0:
        raise ValueError("needs at least one positive weight")
    if total == math.inf:
        raise ValueError("weights too large: their sum is infinite")
    return weights


def repeated(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, sorted: what a "must be unique" error lists."""
    return sorted(n for n, k in Counter(names).items() if k > 1)


def _per_hour(profile: tuple[float, ...]) -> tuple[float, ...]:
    """The profile is repeated over the 60 minutes of each hour of one day."""
    if len(profile) != 24:
        raise ValueError(f"needs 24 values, one per hour (got {len(profile)})")
    return profile


def _every_tier(promise: dict[str, float]) -> dict[str, float]:
    """Every order looks up its tier's promise, so a missing tier would fail mid-run."""
    missing = [t.value for t in Tier if t.value not in promise]
    if missing:
        raise ValueError(f"needs a value for every tier, missing: {', '.join(missing)}")
    return promise


class CityCfg(Finite):
    origin_lat: float = Field(31.2304, ge=-90, le=90)
    origin_lon: float = Field(121.4737, ge=-180, le=180)
    size_km: float = Field(20.0, gt=0)


class CatalogueCfg(Finite):
    skus: int = Field(400, ge=1, le=100_000)
    zipf_a: float = Field(1.1, gt=0, le=20)  # beyond, rare SKUs' popularity underflows to 0 and picks fail


class AgentCfg(Finite):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    reliability: float = Field(0.97, gt=0, le=1)
    categories: tuple[Category, ...] = (Category.AMBIENT,)


class WarehouseCfg(AgentCfg):
    tier: Literal["central", "front"]
    x_km: float
    y_km: float
    picks_per_min: float = Field(gt=0)
    pick_s: float = Field(300.0, ge=0)
    max_queue_s: float = Field(1800.0, gt=0)
    handling_cost: float = Field(1.2, ge=0)
    unit_cost: float = Field(0.15, ge=0)
    cold_surcharge: float = Field(0.8, ge=0)
    assortment: float = Field(1.0, gt=0, le=1)
    stock_per_sku: int = Field(200, ge=0)
    replenish_every_h: float = Field(6.0, gt=0)


class LegCfg(AgentCfg):
    """Last-mile bidders quote only the `max_sources` nearest warehouses per order."""

    max_sources: int = Field(12, ge=1, le=256)


class RiderPoolCfg(LegCfg):
    x_km: float
    y_km: float
    riders: int = Field(ge=1, le=10_000)
    radius_km: float = Field(3.0, gt=0)
    pickup_radius_km: float = Field(8.0, gt=0)
    speed_kmh: float = Field(18.0, gt=0)
    base_fee: float = Field(1.8, ge=0)
    per_km: float = Field(0.55, ge=0)
    handover_s: float = Field(180.0, ge=0)


class CrowdCfg(LegCfg):
    base_couriers: int = Field(ge=1)
    amplitude: float = Field(0.35, ge=0, le=1)
    noise: float = Field(0.1, ge=0, le=1)
    speed_kmh: float = Field(20.0, gt=0)
    base_fee: float = Field(2.6, ge=0)
    per_km: float = Field(0.65, ge=0)
    surge_k: float = Field(1.2, ge=0)
    pickup_mean_s: float = Field(600.0, ge=0)
    handover_s: float = Field(180.0, ge=0)


class LockerCfg(LegCfg):
    x_km: float
    y_km: float
    compartments: int = Field(ge=1)
    max_units: int = Field(6, ge=1)
    walk_km: float = Field(1.0, gt=0)
    shuttle_every_s: float = Field(1800.0, gt=0)
    shuttle_speed_kmh: float = Field(25.0, gt=0)
    fee: float = Field(0.9, ge=0)
    per_km: float = Field(0.12, ge=0)
    collect_mean_h: float = Field(5.0, gt=0)


class FleetCfg(Finite):
    city: CityCfg = CityCfg()
    catalogue: CatalogueCfg = CatalogueCfg()
    warehouses: tuple[WarehouseCfg, ...] = Field(min_length=1)
    rider_pools: tuple[RiderPoolCfg, ...] = ()
    crowd: tuple[CrowdCfg, ...] = ()
    lockers: tuple[LockerCfg, ...] = ()

    @model_validator(mode="after")
    def _unique_ids(self) -> FleetCfg:
        dupes = repeated(a.id for group in (self.warehouses, self.rider_pools, self.crowd, self.lockers) for a in group)
        if dupes:
            raise ValueError(f"agent ids must be unique, repeated: {', '.join(dupes)}")
        if not (self.rider_pools or self.crowd or self.lockers):
            raise ValueError("a fleet needs at least one last-mile resource")
        return self


class ProfileCfg(Finite):
    """Score weights in money: lower score wins."""

    value_of_time_per_h: float = Field(ge=0)
    lateness_penalty: float = Field(ge=0)
    reliability_penalty: float = Field(ge=0)
    vip_lateness_multiplier: float = Field(1.0, ge=1)
    vip_hard_promise: bool = False
    unfulfilled_penalty: float = Field(gt=0)
    vip_unfulfilled_penalty: float = Field(gt=0)
    delay_mean_s: float = Field(900.0, gt=0)


class SpikeCfg(Finite):
    from_h: float = Field(ge=0, le=24)
    to_h: float = Field(ge=0, le=24)
    factor: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> SpikeCfg:
        """A spike covers [from_h, to_h) of one day; reversed, it would silently cover nothing."""
        if self.to_h <= self.from_h:
            raise ValueError("to_h must be later than from_h (a spike cannot wrap past midnight)")
        return self


class RoundCfg(Finite):
    window_s: float = Field(2.0, gt=0)
    max_batch: int = Field(64, ge=1, le=4096)
    max_attempts: int = Field(10, ge=1)
    retry_after_s: float = Field(120.0, ge=0)
    hold_ttl_s: float = Field(5.0, gt=0)


class ScenarioCfg(Finite):
    name: str
    description: str = ""
    fleet: str = "default"
    profile: str = "balanced"
    payment: Literal["first_score", "second_score"] = "first_score"
    orders_per_day: int = Field(ge=1)
    hourly_profile: Annotated[tuple[Weight, ...], AfterValidator(_per_hour), AfterValidator(_some_weight)]
    spikes: tuple[SpikeCfg, ...] = ()
    vip_share: float = Field(0.1, ge=0, le=1)
    category_mix: Annotated[dict[Category, Weight], AfterValidator(_some_weight)]
    locker_ok_share: float = Field(0.3, ge=0, le=1)
    promise_min: Annotated[dict[Literal["vip", "regular"], Annotated[float, Field(gt=0)]], AfterValidator(_every_tier)]
    channels: Annotated[dict[str, Weight], AfterValidator(_some_weight)] = Field(default_factory=lambda: {"app": 1.0})
    max_lines: int = Field(4, ge=1)
    max_qty: int = Field(3, ge=1)
    value_mean: float = Field(60.0, gt=0)
    reserve_base: float = Field(10.0, ge=0)
    reserve_share: float = Field(0.4, ge=0)
    hotspot_share: float = Field(0.7, ge=0, le=1)
    hotspot_sigma_km: float = Field(1.5, gt=0)
    round: RoundCfg = RoundCfg()
    exact_every: int = Field(20, ge=0)


def _describe(err: ValidationError, most: int = 3) -> str:
    """The first few problems as 'key: reason' pairs on one line."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()[:most]]
    more = err.error_count() - most
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _read_text(path: Path) -> str:
    """A config file's text; any path that is no readable UTF-8 file is a ConfigError saying why."""
    try:
        if not path.is_file():  # checked first, so a FIFO or device never blocks the read
            raise ConfigError(f"{path}: {'a folder, not a file' if path.is_dir() else 'file not found'}")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None


def _read_yaml(path: Path) -> Any:
    text = _read_text(path)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError(f"{path}: {where}: not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply)") from None


def parse_model(model: type[M], data: Any, source: str) -> M:
    """Validates `data` into `model`, raising a one-line ConfigError naming `source`."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None


def _resolve(name_or_path: str, folder: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    return CONFIG_DIR / folder / f"{name_or_path}.yaml"


def available(folder: str) -> list[str]:
    """Names of the configs shipped in `configs/<folder>/`."""
    return sorted(p.stem for p in (CONFIG_DIR / folder).glob("*.yaml"))


def load_fleet(name_or_path: str = "default") -> FleetCfg:
    """Loads a fleet by name (configs/fleets/NAME.yaml) or path."""
    path = _resolve_known(name_or_path, "fleets", "fleet")
    return parse_model(FleetCfg, _read_yaml(path), str(path))


def load_scenario(name_or_path: str) -> ScenarioCfg:
    """Loads a scenario by name (configs/scenarios/NAME.yaml) or path."""
    path = _resolve_known(name_or_path, "scenarios", "scenario")
    return parse_model(ScenarioCfg, _read_yaml(path), str(path))


def _resolve_known(name_or_path: str, folder: str, what: str) -> Path:
    """`_resolve`, with the shipped names in the error when a bare name is not one of them."""
    path = _resolve(name_or_path, folder)
    if not Path(name_or_path).suffix and not path.is_file():  # a path's own problems are _read_text's to say
        raise ConfigError(f"unknown {what} '{name_or_path}' ({_known(folder)})")
    return path


def _known(folder: str) -> str:
    """The names a bare name could have been or, when there is no folder to hold them, which folder is missing."""
    where = CONFIG_DIR / folder
    if not where.is_dir():
        missing = where if CONFIG_DIR.is_dir() else CONFIG_DIR
        return f"config folder {missing} does not exist; BIDHIVE_CONFIG_DIR names the folder holding {folder}/"
    return f"known: {', '.join(available(folder)) or f'none in {where}'}"


def load_profiles(path: str | Path | None = None) -> dict[str, ProfileCfg]:
    """Loads every strategy profile from configs/profiles.yaml (or `path`)."""
    file = Path(path) if path else CONFIG_DIR / "profiles.yaml"
    data = _read_yaml(file)
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{file}: (top level): expected a mapping of profile names to weights")
    return {name: parse_model(ProfileCfg, body, f"{file}: {name}") for name, body in data.items()}


def load_profile(name: str, path: str | Path | None = None) -> ProfileCfg:
    """One profile by name, with the known names in the error."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise ConfigError(f"unknown profile '{name}' (known: {', '.join(sorted(profiles))})")
    return profiles[name]
