"""Configs: TOML files over configs/defaults.toml, then `section.key=value` overrides."""
from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = PROJECT_ROOT / "configs" / "defaults.toml"


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    cfg = _read(DEFAULTS)
    if path:
        path = Path(path)
        if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
            path = PROJECT_ROOT / path  # configs/demo.toml from any working directory
        _merge(cfg, _read(path), str(path))
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        _merge(cfg, {section: {name: parse_value(value)}}, "override")
    return cfg


def parse_value(value: Any) -> Any:
    """'10' -> 10, 'true' -> True, '"x"' -> 'x', 'x' -> 'x' (strings need no quotes)."""
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def _merge(cfg: dict, update: dict, where: str) -> None:
    for section, values in update.items():
        if section not in cfg or not isinstance(values, dict):
            raise ValueError(f"{where}: unknown config section [{section}]; "
                             f"sections are {', '.join(cfg)} (see {DEFAULTS})")
        for key, value in values.items():
            if key not in cfg[section]:
                raise ValueError(f"{where}: unknown setting {section}.{key}; "
                                 f"[{section}] has {', '.join(cfg[section]) or 'no settings'}")
            default = cfg[section][key]
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise ValueError(f"{where}: {section}.{key} = {value!r} should be a "
                                 f"{type(default).__name__} like the default {default!r}")
            cfg[section][key] = copy.deepcopy(value)
