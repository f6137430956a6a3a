"""Config loading: defaults, files, overrides, and clear errors on typos."""
from __future__ import annotations

import pytest

from flows.config import load_config, parse_value


def test_demo_overrides_defaults_and_set_overrides_demo():
    cfg = load_config("configs/demo.toml", {"train.max_steps": "7", "filter.toxicity": "off"})
    assert cfg["source"]["kind"] == "pydoc"
    assert cfg["train"]["max_steps"] == 7
    assert cfg["filter"]["toxicity"] == "off"
    assert cfg["train"]["weight_decay"] == 0.1  # untouched default


def test_values_parse_like_toml():
    assert parse_value("3") == 3 and parse_value("2e-3") == 0.002
    assert parse_value("true") is True and parse_value("some/path") == "some/path"


@pytest.mark.parametrize("overrides, message", [
    ({"train.max_step": 1}, "unknown setting train.max_step"),
    ({"trian.max_steps": 1}, "unknown config section"),
    ({"train.max_steps": "many"}, "should be a int"),
])
def test_mistakes_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config("configs/demo.toml", overrides)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
