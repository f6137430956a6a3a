"""The run config: one typed section per stage, checked whole before anything runs.

Each section's class lives beside the code it configures (SourceConfig in corpus/sources.py,
TrainConfig in trainer/train.py, ...) and is the only home of its defaults, types, ranges
and allowed values. A config file (TOML) and `section.key=value` overrides are laid over
those defaults; every bad value is reported, one line each, before the first stage runs.
configs/defaults.toml is generated from the classes (`c2m config --defaults`) and a test
keeps it in step.

Fields a section lists in UNVERSIONED (paths, worker counts, threads, log cadence) do not
change what a stage writes, so they are left out of the artifact versions.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import os
import tomllib
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import annotated_types
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass

if typing.TYPE_CHECKING:  # the section classes are imported on first use, see sections()
    from corpus.dedup import DedupConfig
    from corpus.filter import FilterConfig
    from corpus.holdout import HoldoutConfig
    from corpus.quality import QualityConfig
    from corpus.shard import ShardConfig, SplitConfig
    from corpus.sources import SourceConfig
    from corpus.tokenizer import TokenizerConfig
    from flows.parallel import DaskConfig
    from trainer.evaluate import EvaluateConfig
    from trainer.train import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# c2m's own files: the server's state, logs, the local cache of a remote artifact store
STATE = Path(os.environ.get("C2M_STATE", PROJECT_ROOT / ".c2m"))
DEFAULTS = PROJECT_ROOT / "configs" / "defaults.toml"
STRICT = ConfigDict(strict=True, extra="forbid", validate_assignment=True)


@dataclass(config=STRICT)
class RunConfig:
    """Where this run's artifacts live."""
    artifacts: str = Field("artifacts", description="artifact root (relative to the working directory)")

    UNVERSIONED: ClassVar[tuple[str, ...]] = ("artifacts",)


@functools.cache
def sections() -> dict[str, type]:
    """Section name -> its typed config, in DAG order (the order of defaults.toml).
    Imported on first use: trainer's configs bring torch, which `c2m --help` need not."""
    from corpus.dedup import DedupConfig
    from corpus.filter import FilterConfig
    from corpus.holdout import HoldoutConfig
    from corpus.quality import QualityConfig
    from corpus.shard import ShardConfig, SplitConfig
    from corpus.sources import SourceConfig
    from corpus.tokenizer import TokenizerConfig
    from flows.parallel import DaskConfig
    from trainer.evaluate import EvaluateConfig
    from trainer.train import TrainConfig

    return {"run": RunConfig, "dask": DaskConfig, "source": SourceConfig, "holdout": HoldoutConfig,
            "filter": FilterConfig,
            "quality": QualityConfig, "dedup": DedupConfig, "split": SplitConfig,
            "tokenizer": TokenizerConfig, "shard": ShardConfig, "train": TrainConfig,
            "evaluate": EvaluateConfig}


@dataclasses.dataclass(frozen=True)
class Config:
    run: RunConfig
    dask: DaskConfig
    source: SourceConfig
    holdout: HoldoutConfig
    filter: FilterConfig
    quality: QualityConfig
    dedup: DedupConfig
    split: SplitConfig
    tokenizer: TokenizerConfig
    shard: ShardConfig
    train: TrainConfig
    evaluate: EvaluateConfig

    def section(self, name: str):
        return getattr(self, name)

    def to_toml(self) -> str:
        return render_toml(self, comments=False)


class ConfigError(ValueError):
    """One line per bad value: where it came from, the key, the value, what is allowed."""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """The defaults, then the TOML file at `path` (over the file its top-level `extends`
    names, if any), then `section.key=value` overrides;
    raises ConfigError naming every bad key or value."""
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}  # dotted key -> where its value came from
    errors: list[str] = []
    if path:
        path = Path(path)
        if not path.is_file() and not path.is_absolute() and (PROJECT_ROOT / path).is_file():
            path = PROJECT_ROOT / path  # configs/demo.toml from any working directory
        for key, value, where in _layers(path):
            _put(raw, key, value, where, origin, errors)
    for key, value in (overrides or {}).items():
        _put(raw, key, parse_value(value), "--set", origin, errors)
    known = sections()
    for name in raw.keys() - known.keys():
        close = difflib.get_close_matches(name, known, n=1)
        errors.append(f"{_where(origin, name, None)}: unknown config section [{name}]; "
                      + (f"did you mean [{close[0]}]? " if close else "")
                      + f"sections are {', '.join(known)}")
    built = {name: _build(cls, raw.get(name, {}), name, origin, errors) for name, cls in known.items()}
    if errors:
        raise ConfigError("\n".join(dict.fromkeys(errors)))
    return Config(**built)


def parse_value(value: Any) -> Any:
    """'10' -> 10, 'true' -> True, '"x"' -> 'x', 'x' -> 'x' (strings need no quotes)."""
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def versioned(section: Any) -> dict:
    """The settings of a section that change what its stage writes."""
    skip = getattr(type(section), "UNVERSIONED", ())
    return {k: v for k, v in dataclasses.asdict(section).items() if k not in skip}


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """A config section (nested ones too) from a partial dict; ConfigError if bad."""
    errors: list[str] = []
    section = _build(cls, values, prefix or cls.__name__, {}, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return section


# -- reading -----------------------------------------------------------------------

def _read(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None  # a usage error: exit 2
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _layers(path: Path, below: tuple[Path, ...] = ()) -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted key, value, file) of a config file, after those of the file it `extends`
    (a path relative to it), so that it overrides them."""
    tree = _read(path)
    base = tree.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: extends = {base!r}: should be the path of another config file")
        base_path = (path.parent / base).resolve()
        if base_path in below or base_path == path.resolve():
            raise ConfigError(f"{path}: extends {base} makes a loop ({' -> '.join(map(str, below))})")
        if not base_path.is_file():
            raise ConfigError(f"config file {base_path} not found (extends in {path})")
        yield from _layers(base_path, (*below, path.resolve()))
    for key, value in _leaves(tree):
        yield key, value, str(path)


def _leaves(tree: dict, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _put(raw: dict, key: str, value: Any, where: str, origin: dict, errors: list[str]) -> None:
    parts = key.split(".")
    if len(parts) < 2:
        errors.append(f"{where}: {key} = {value!r}: a setting is section.key, e.g. train.max_steps")
        return
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.setdefault(part, {}), dict):
            errors.append(f"{where}: {key}: {part} is a setting, not a section")
            return
        node = node[part]
    node[parts[-1]] = value
    origin.pop(key, None)  # re-inserted: the order of `origin` is the order of precedence
    origin[key] = where


def _build(cls: type, values: Any, prefix: str, origin: dict, errors: list[str]) -> Any:
    if not isinstance(values, dict):
        errors.append(f"{origin.get(prefix, 'config')}: {prefix} is a section, not a value")
        return None
    fields = cls.__pydantic_fields__
    kwargs, ok = {}, True
    for key, value in values.items():
        dotted = f"{prefix}.{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {prefix}.{close[0]}? " if close else ""
            errors.append(f"{_where(origin, dotted, value)}: unknown setting {dotted}; {hint}"
                          f"[{prefix}] has {', '.join(fields)}")
            ok = False
            continue
        sub = _nested_class(fields[key].annotation)
        if sub is not None:
            kwargs[key] = _build(sub, value, dotted, origin, errors)
            ok = ok and kwargs[key] is not None
        else:
            kwargs[key] = float(value) if _is_float(fields[key]) and type(value) is int else value
    if not ok:
        return None
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
            if not loc:  # a rule across fields (a model validator)
                errors.append(f"{_where(origin, prefix, None)}: [{prefix}] {err['msg'].removeprefix('Value error, ')}")
                continue
            dotted = f"{prefix}.{loc[0]}"
            value = values.get(loc[0], err.get("input"))
            why = (err["msg"].removeprefix("Value error, ") if err["type"] == "value_error"
                   else f"should be {allowed(fields[loc[0]])}")
            errors.append(f"{_where(origin, dotted, value)}: {dotted} = {_show(value)}: {why}")
        return None


def _where(origin: dict, key: str, value: Any) -> str:
    if key in origin:
        return origin[key]
    found = [w for k, w in origin.items() if k.startswith(key + ".")]
    return found[-1] if found else "config"  # the last source laid over the others


def _show(value: Any) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


def _nested_class(annotation: Any) -> type | None:
    return annotation if isinstance(annotation, type) and hasattr(annotation, "__pydantic_fields__") else None


def _is_float(field) -> bool:
    return field.annotation is float


# -- what a field allows, in words (errors and defaults.toml) ------------------------

def allowed(field) -> str:
    ann = field.annotation
    origin = typing.get_origin(ann)
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in typing.get_args(ann))
    if origin is list:
        (item,) = typing.get_args(ann)
        if typing.get_origin(item) is Literal:
            return "a list of " + ", ".join(_show(a) for a in typing.get_args(item))
        return f"a list of {item.__name__}"
    if ann is bool:
        return "true or false"
    bounds = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{sign} {_number(getattr(m, attr))}")
    noun = {int: "an integer", float: "a number", str: "a string"}.get(ann, "a value")
    return noun + (" " + " and ".join(bounds) if bounds else "")


def _number(v: float) -> str:
    return f"{v:,}" if isinstance(v, int) else repr(v)


def render_toml(cfg: Config | None = None, comments: bool = True) -> str:
    """A config as TOML; with comments: every setting's meaning and allowed values
    (configs/defaults.toml is this for the defaults)."""
    cfg = cfg or load_config()
    lines: list[str] = []
    if comments:
        lines += ["# Every setting, with its default, generated by `c2m config --defaults` from the",
                  "# typed configs beside each stage's code (do not edit: a test checks it).",
                  "# Other configs (demo.toml, ...) override some of them; `--set section.key=value`",
                  "# overrides one for a single run. A key that is not here is an error.",
                  '# A config file may name another it overrides: extends = "../demo.toml".', ""]
    for name in sections():
        _render_section(cfg.section(name), name, lines, comments)
    return "\n".join(lines).rstrip() + "\n"


def _render_section(section: Any, name: str, lines: list[str], comments: bool) -> None:
    cls = type(section)
    fields = cls.__pydantic_fields__
    nested = [k for k, f in fields.items() if _nested_class(f.annotation)]
    if comments and cls.__doc__:
        lines += [f"# {line}".rstrip() for line in inspect.cleandoc(cls.__doc__).splitlines()]
    if len(nested) < len(fields):
        lines.append(f"[{name}]")
    unversioned = getattr(cls, "UNVERSIONED", ())
    for key, field in fields.items():
        if key in nested:
            continue
        if comments:
            kind = allowed(field)
            notes = [field.description, None if kind in ("a string", "true or false") else kind,
                     "not part of the version" if key in unversioned else None]
            if any(notes):
                lines.append("# " + "; ".join(n for n in notes if n))
        lines.append(f"{key} = {_toml_value(getattr(section, key))}")
    lines.append("")
    for key in nested:
        _render_section(getattr(section, key), f"{name}.{key}", lines, comments)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


if __name__ == "__main__":
    print(render_toml(), end="")
