"""Config loading: shipped configs are valid, bad ones fail with one precise line."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import market.config
from market.config import ConfigError, available, load_fleet, load_profiles, load_scenario

CONFIGS = Path(market.config.CONFIG_DIR)


def test_shipped_configs_load() -> None:
    assert set(available("scenarios")) >= {"weekday", "peak", "coldchain"}
    assert set(load_profiles()) == {"cost_first", "time_first", "balanced", "vip_guard"}
    fleet = load_fleet("default")
    assert len(fleet.warehouses) == 9 and len(fleet.rider_pools) == 6 and len(fleet.crowd) == 2 and len(fleet.lockers) == 8
    for name in available("scenarios"):
        load_scenario(name)


def test_bad_value_names_file_and_key(tmp_path: Path) -> None:
    text = Path(load_scenario.__globals__["CONFIG_DIR"] / "scenarios/weekday.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("vip_share: 0.1", "vip_share: 1.7"))
    with pytest.raises(ConfigError) as err:
        load_scenario(str(bad))
    msg = str(err.value)
    assert str(bad) in msg and "vip_share" in msg and "\n" not in msg


def test_unknown_key_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("warehouses: []\ncolour: blue\n")
    with pytest.raises(ConfigError, match="colour"):
        load_fleet(str(bad))
    with pytest.raises(ConfigError, match="file not found"):
        load_fleet(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="unknown scenario 'nope'"):
        load_scenario("nope")


def test_invalid_yaml_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_scenario(str(bad))


def test_duplicate_agent_ids_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "dupe.yaml"
    bad.write_text(
        "warehouses:\n"
        "  - {id: a, tier: front, x_km: 0, y_km: 0, picks_per_min: 1}\n"
        "crowd:\n"
        "  - {id: a, base_couriers: 3}\n"
    )
    with pytest.raises(ConfigError, match="repeated: a"):
        load_fleet(str(bad))


def _denied(self: Path, *args: object, **kwargs: object) -> str:
    raise PermissionError(13, "Permission denied", str(self))


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p.write_bytes(b"\xfe\xff\x00journal\x93"), "not a text (UTF-8) file"),
    (lambda p: p.mkdir(), "a folder, not a file"),
    (lambda p: p.write_text("[" * 5000 + "]" * 5000), "not valid YAML (nested too deeply)"),
])
def test_unreadable_file_is_one_line(tmp_path: Path, make, expected: str) -> None:
    bad = tmp_path / "scenario.yaml"
    make(bad)
    with pytest.raises(ConfigError) as err:
        load_scenario(str(bad))
    assert str(err.value) == f"{bad}: {expected}"


def test_file_without_read_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("warehouses: []\n")
    monkeypatch.setattr(Path, "read_text", _denied)  # chmod 000 does not stop root
    with pytest.raises(ConfigError) as err:
        load_fleet(str(bad))
    assert str(err.value) == f"{bad}: cannot be read (Permission denied)"


@pytest.mark.parametrize(("old", "new", "key"), [
    ("channels: {app: 0.6, web: 0.3, marketplace: 0.1}", "channels: {}", "channels"),
    ("channels: {app: 0.6, web: 0.3, marketplace: 0.1}", "channels: {app: 0}", "channels"),
    ("channels: {app: 0.6, web: 0.3, marketplace: 0.1}", "channels: {app: -1, web: 2}", "channels.app"),
    ("channels: {app: 0.6, web: 0.3, marketplace: 0.1}", "channels: {app: .inf}", "channels.app"),
    ("promise_min: {vip: 60, regular: 150}", "promise_min: {vip: 60}", "promise_min"),
    ("promise_min: {vip: 60, regular: 150}", "promise_min: {vip: 0, regular: 150}", "promise_min.vip"),
    ("promise_min: {vip: 60, regular: 150}", "promise_min: {vip: 60, regular: -5}", "promise_min.regular"),
    ("hourly_profile: [0.3,", "hourly_profile: [.nan,", "hourly_profile.0"),
    ("hourly_profile: [0.3,", "hourly_profile: [.inf,", "hourly_profile.0"),
    ("hourly_profile: [0.3,", "hourly_profile: [-0.3,", "hourly_profile.0"),
    ("hourly_profile: [0.3, 0.2,", "hourly_profile: [0.3,", "hourly_profile"),
    ("category_mix: {ambient: 0.72, chilled: 0.14,", "category_mix: {ambient: 1e308, chilled: 1e308,", "category_mix"),
    ("vip_share: 0.1", "vip_share: 0.1\nspikes: [{from_h: 22, to_h: 2, factor: 3}]", "spikes.0"),
    ("vip_share: 0.1", "vip_share: 0.1\nvalue_mean: .inf", "value_mean"),
])
def test_bad_scenario_value_names_the_field(tmp_path: Path, old: str, new: str, key: str) -> None:
    _names_the_field(load_scenario, CONFIGS / "scenarios/weekday.yaml", tmp_path / "bad.yaml", old, new, key)


def _names_the_field(load: Callable[[str], object], shipped: Path, bad: Path, old: str, new: str, key: str) -> None:
    """A shipped config with one value made bad fails in one line naming the file and the field."""
    text = shipped.read_text()
    assert old in text
    bad.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        load(str(bad))
    msg = str(err.value)
    assert msg.startswith(f"{bad}: {key}: ") and "\n" not in msg


@pytest.mark.parametrize(("old", "new", "key"), [
    ("zipf_a: 1.1", "zipf_a: 300", "catalogue.zipf_a"),
    ("size_km: 20", "size_km: .inf", "city.size_km"),
    ("x_km: -8.0", "x_km: .nan", "warehouses.0.x_km"),
])
def test_bad_fleet_value_names_the_field(tmp_path: Path, old: str, new: str, key: str) -> None:
    _names_the_field(load_fleet, CONFIGS / "fleets/default.yaml", tmp_path / "fleet.yaml", old, new, key)


def test_missing_config_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(market.config, "CONFIG_DIR", tmp_path / "nope")
    with pytest.raises(ConfigError, match=f"unknown scenario 'weekday' \\(config folder {tmp_path / 'nope'} does not"):
        load_scenario("weekday")
    monkeypatch.setattr(market.config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=f"unknown fleet 'default' \\(config folder {tmp_path / 'fleets'} does not"):
        load_fleet("default")
    (tmp_path / "fleets").mkdir()
    with pytest.raises(ConfigError, match=f"known: none in {tmp_path / 'fleets'}"):
        load_fleet("default")
