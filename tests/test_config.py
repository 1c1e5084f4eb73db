"""Config loading: shipped configs are valid, bad ones fail with one precise line."""
from __future__ import annotations

from pathlib import Path

import pytest

from market.config import ConfigError, available, load_fleet, load_profiles, load_scenario


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
