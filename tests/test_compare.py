"""`c2m compare`: variants through the flow, shared stages built once, the same eval
bytes for every tokenizer, a table, curves and a verdict that respects the seed spread."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import C2M, tiny_overrides
from flows.config import PROJECT_ROOT
from flows.compare import check_comparable, config_diff, render, settings, variants_from, verdicts
from flows.config import ConfigError, load_config
from flows.store import ArtifactStore


def row(name, scores, **extra):
    return {"variant": name, "seeds": [{"seed": i, "bits_per_byte": s, "eval_bytes": 1000}
                                       for i, s in enumerate(scores)],
            "mean": sum(scores) / len(scores), "low": min(scores), "high": max(scores), **extra}


def test_a_difference_is_real_only_beyond_the_seed_spread():
    a = row("A", [2.00, 2.02])
    overlapping, separated, worse = row("B", [1.99, 2.01]), row("C", [1.90, 1.93]), row("D", [2.10, 2.2])
    said = verdicts([a, overlapping, separated, worse])
    assert "within seed noise" in said[0] and "-0.0100" in said[0]
    assert "**real**" in said[1] and "C is better" in said[1] and "-0.0950" in said[1]
    assert "**real**" in said[2] and "A is better" in said[2]
    assert "no spread" in verdicts([row("A", [2.0]), row("B", [1.0])])[0]


def test_the_diff_names_each_changed_setting_and_not_the_seed():
    base = settings(load_config("configs/compare/quality-on.toml"))
    off = settings(load_config("configs/compare/quality-off.toml", {"train.seed": 7}))
    assert config_diff(base, off) == ["quality.c4.enabled: true -> false",
                                      "quality.gopher_quality.enabled: true -> false"]
    assert config_diff(base, base) == []


def test_variants_must_share_model_shape_and_budget():
    variants = variants_from([{"train.n_embd": 64}, {"train.max_steps": 50}], base="configs/demo.toml")
    with pytest.raises(ConfigError, match=r"V2 sets train.n_embd = 128, V1 64.*V2 sets train.max_steps = 50"):
        check_comparable(variants, [v.load({}) for v in variants], seeds=2)
    with pytest.raises(ConfigError, match="two variants or more"):
        variants_from(["configs/demo.toml"], base="")


def test_the_cli_refuses_bad_comparisons_before_running_anything(tmp_path):
    for args, code, message in (
            (["configs/compare/quality-on.toml", "configs/demo.toml"], 2, "same model shape"),
            (["configs/compare/quality-on.toml", "configs/compare/quality-off.toml", "--seeds", "0"], 2, "--seeds 0"),
            (["configs/compare/quality-on.toml"], 2, "two variants or more"),
            (["configs/compare/quality-on.toml", str(tmp_path / "no-such.toml")], 2, "not found")):
        done = subprocess.run([C2M, "compare", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == code and message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and "the full traceback" not in done.stderr  # usage errors


@pytest.fixture(scope="module")
def compared(prefect_harness, tiny_corpus, tmp_path_factory):
    """Two variants that differ in the tokenizer, two seeds each."""
    from flows.compare import compare

    artifacts = tmp_path_factory.mktemp("compare") / "artifacts"
    common = tiny_overrides(tiny_corpus, artifacts)
    result = compare(configs=[{}, {"tokenizer.vocab_size": 300}], seeds=2, base="configs/demo.toml",
                     overrides=common)
    return ArtifactStore(artifacts), result


def test_compare_shares_stages_and_scores_every_variant_on_the_same_bytes(compared):
    store, result = compared
    folder = store.path("compare", result["compare"])
    rows = json.loads((folder / "rows.json").read_text())
    assert [r["variant"] for r in rows] == ["V1", "V2"]
    assert rows[1]["diff"] == ["tokenizer.vocab_size: 400 -> 300"]
    # the data up to dedup is one set of versions for all four runs; the tokenizer differs
    assert rows[0]["data_versions"]["dedup"] == rows[1]["data_versions"]["dedup"]
    assert rows[0]["data_versions"]["tokenizer"] != rows[1]["data_versions"]["tokenizer"]
    assert len(store.versions("dedup")) == 1 and len(store.versions("tokenizer")) == 2
    trains = [s["versions"]["train"] for r in rows for s in r["seeds"]]
    assert len(set(trains)) == 4 and len(store.versions("train")) == 4
    assert [s["seed"] for s in rows[0]["seeds"]] == [1337, 1338]
    # the same eval documents in two tokenizations: the same bytes, up to a window's tail
    scored = [s["eval_bytes"] for r in rows for s in r["seeds"]]
    set_bytes = store.manifest("holdout", rows[0]["data_versions"]["holdout"])["stats"]["eval"]["bytes"]
    assert all(0.9 * set_bytes < b <= set_bytes for b in scored)
    for r in rows:
        assert r["low"] <= r["mean"] <= r["high"] and all(0 < s["bits_per_byte"] < 10 for s in r["seeds"])
        assert [len(s["curve"]) for s in r["seeds"]] == [len(r["seeds"][0]["curve"])] * 2
    markdown = (folder / "report.md").read_text()
    assert "| V2 | tokenizer.vocab\\_size: 400 -\\> 300 | 22 |" in markdown
    assert "![eval curves](eval_curves.png)" in markdown and (folder / "eval_curves.png").stat().st_size > 10_000
    assert set(result["variants"]) == {"V1", "V2"}


def test_comparing_again_builds_nothing(compared, tiny_corpus):
    from flows.compare import compare

    store, first = compared
    before = {s: store.versions(s) for s in store.stages()}
    again = compare(configs=[{}, {"tokenizer.vocab_size": 300}], seeds=2, base="configs/demo.toml",
                    overrides=tiny_overrides(tiny_corpus, store.root))
    assert again["compare"] == first["compare"]
    assert {s: store.versions(s) for s in store.stages()} == before


def test_render_shows_the_table_and_verdict():
    rows = [row("A", [2.0, 2.1], diff=[], docs_kept=10, train_tokens=1000, train_seconds=3.0,
                config="a.toml", overrides={}, data_versions={"holdout": "abc"}),
            row("B", [1.5, 1.6], diff=["dedup.near: true -> false"], docs_kept=12, train_tokens=1200,
                train_seconds=3.5, config="b.toml", overrides={}, data_versions={"holdout": "abc"})]
    text = render(rows, verdicts(rows), "eval_curves.png")
    assert "| B | dedup.near: true -\\> false | 12 | 1,200 | 1.5000, 1.6000 | **1.5500** ± 0.0500 |" in text
    assert "B is better" in text
