"""The typed config: defaults in one place, files and overrides over them, every bad value
named in one line before anything runs, and versions that ignore what changes no artifact."""
from __future__ import annotations

import subprocess
import time

import pytest

from conftest import C2M
from flows.config import (DEFAULTS, PROJECT_ROOT, ConfigError, load_config, parse_value, render_toml, sections,
                          versioned)
from flows.stages import STAGES

def test_demo_overrides_defaults_and_set_overrides_demo():
    cfg = load_config("configs/demo.toml", {"train.max_steps": "7", "filter.toxicity": "off"})
    assert cfg.source.kind == "pydoc"
    assert cfg.train.max_steps == 7
    assert cfg.filter.toxicity == "off"
    assert cfg.train.weight_decay == 0.1  # untouched default
    assert cfg.quality.fineweb.enabled is False and cfg.quality.c4.enabled is True  # nested tables


def test_values_parse_like_toml():
    assert parse_value("3") == 3 and parse_value("2e-3") == 0.002
    assert parse_value("true") is True and parse_value("some/path") == "some/path"
    assert parse_value('["en", "de"]') == ["en", "de"]


def test_defaults_toml_is_generated_from_the_typed_configs():
    assert DEFAULTS.read_text() == render_toml(), (
        "configs/defaults.toml is out of date: regenerate it with `c2m config --defaults > "
        "configs/defaults.toml`")
    # and it reads back as exactly the defaults
    assert load_config(DEFAULTS) == load_config()


def test_every_setting_has_one_home():
    """No section is empty, and no setting name means two things across the config."""
    for name, cls in sections().items():
        assert cls.__pydantic_fields__, f"[{name}] has no settings"


@pytest.mark.parametrize("overrides, message", [
    ({"train.max_step": 1}, "unknown setting train.max_step; did you mean train.max_steps?"),
    ({"trian.max_steps": 1}, "unknown config section [trian]; did you mean [train]?"),
    ({"train.max_steps": "many"}, "train.max_steps = 'many': should be an integer >= 1"),
    ({"train.max_steps": -5}, "train.max_steps = -5: should be an integer >= 1"),
    ({"train.max_steps": 0}, "train.max_steps = 0: should be an integer >= 1"),
    ({"train.learning_rate": -0.1}, "train.learning_rate = -0.1: should be a number > 0"),
    ({"train.schedule": "cosin"}, "train.schedule = 'cosin': should be one of 'cosine', 'wsd'"),
    ({"train.device": "gpu"}, "train.device = 'gpu': should be one of 'auto', 'cpu', 'cuda'"),
    ({"train.dtype": "bf16"}, "train.dtype = 'bf16': should be one of 'auto', 'float32'"),
    ({"tokenizer.vocab_size": 100}, "tokenizer.vocab_size = 100: should be an integer >= 258"),
    ({"train.n_embd": 100, "train.n_head": 3}, "n_embd (100) must be a multiple of n_head (3)"),
    ({"quality.c4.skip": '["c4_curly"]'}, "quality.c4.skip = ['c4_curly']: should be a list of"),
    ({"quality.gopher.enabled": "false"}, "unknown setting quality.gopher;"),
    ({"dask.memory_limit": "lots"}, "dask.memory_limit = 'lots': 'lots' is not a size"),
    ({"source.kind": "path"}, "kind = 'path' needs path"),
    ({"split.val_fraction": 0}, "split.val_fraction = 0: should be a number > 0 and < 1"),
    ({"train": 3}, "a setting is section.key"),
])
def test_mistakes_are_named_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config("configs/demo.toml", overrides)
    lines = str(info.value).splitlines()
    assert len(lines) == len(overrides) or "n_embd" in message
    assert any(message in line and line.startswith("--set: ") for line in lines), lines


def test_every_bad_value_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nmax_steps = -5\nschedule = 'cosin'\n[tokenizer]\nvocab_size = 100\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad, {"train.dtype": "bf16"})
    lines = str(info.value).splitlines()
    assert len(lines) == 4
    assert sum(line.startswith(f"{bad}: ") for line in lines) == 3
    assert any(line.startswith("--set: train.dtype") for line in lines)


def test_missing_and_broken_config_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "broken.toml").write_text("[train\nmax_steps = 3\n")
    with pytest.raises(ConfigError, match="broken.toml: not valid TOML"):
        load_config(tmp_path / "broken.toml")


def test_a_bad_config_fails_the_cli_within_seconds_with_no_traceback():
    started = time.time()
    proc = subprocess.run([C2M, "run", "--set", "train.max_steps=-5", "--set", "train.dtype=bf16"],
                          capture_output=True, text=True, timeout=60)
    assert time.time() - started < 30
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "train.max_steps = -5: should be an integer >= 1" in proc.stderr
    assert "train.dtype = 'bf16'" in proc.stderr


def _versions(cfg) -> dict[str, dict]:
    return {name: stage.config(cfg) for name, stage in STAGES.items()}


def test_settings_that_change_no_artifact_are_left_out_of_versions():
    base = load_config("configs/demo.toml")
    moved = load_config("configs/demo.toml", {
        "run.artifacts": "/elsewhere", "dask.workers": 7, "dask.local_directory": "/tmp/x",
        "train.log_every": 3, "train.threads": 1, "evaluate.batch_size": 64,
        "filter.toxicity_batch_size": 8})
    assert _versions(moved) == _versions(base)
    changed = load_config("configs/demo.toml", {"train.max_steps": 10})
    diff = [name for name in STAGES if _versions(changed)[name] != _versions(base)[name]]
    assert diff == ["train"]
    assert "dtype" not in versioned(base.train) and "device" not in versioned(base.train)


def test_the_dtype_that_really_runs_is_part_of_the_train_version():
    from flows.stages import train_identity

    f32 = train_identity(load_config("configs/demo.toml", {"train.dtype": "float32"}))
    bf16 = train_identity(load_config("configs/demo.toml", {"train.dtype": "bfloat16"}))
    assert (f32["dtype"], bf16["dtype"]) == ("float32", "bfloat16") and f32 != bf16
    auto = train_identity(load_config("configs/demo.toml"))  # resolved here, never "auto"
    assert auto["dtype"] in ("float32", "bfloat16") and auto["device"] == "cpu"
    assert auto == (bf16 if auto["dtype"] == "bfloat16" else f32)


def test_a_config_extends_another_and_overrides_it(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('extends = "../demo.toml"\n[train]\nmax_steps = 600\n'.replace(
        "../demo.toml", str(PROJECT_ROOT / "configs" / "demo.toml")))
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.toml"
    child.write_text('extends = "../base.toml"\n[dedup]\nnear = false\n[train]\nmax_steps = 500\n')
    cfg = load_config(child)
    assert (cfg.dedup.near, cfg.train.max_steps, cfg.tokenizer.vocab_size) == (False, 500, 4096)  # 4096: demo's
    bad = tmp_path / "bad.toml"
    bad.write_text('extends = "base.toml"\n[train]\nmax_stepz = 1\n')
    with pytest.raises(ConfigError, match=f"{bad}: unknown setting train.max_stepz"):
        load_config(bad)
    loop = tmp_path / "loop.toml"
    loop.write_text('extends = "loop2.toml"\n')
    (tmp_path / "loop2.toml").write_text('extends = "loop.toml"\n')
    with pytest.raises(ConfigError, match="makes a loop"):
        load_config(loop)
    (tmp_path / "orphan.toml").write_text('extends = "gone.toml"\n')
    with pytest.raises(ConfigError, match=r"gone.toml not found \(extends in"):
        load_config(tmp_path / "orphan.toml")
