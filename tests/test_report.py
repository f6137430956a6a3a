"""Reports from manifests: escaping, plots embedded for Prefect, warnings, cache hits, summary.

The stats below are copied from a real demo run's manifests (202 pydoc pages, 1,100 steps),
trimmed to a few examples; a renderer (markdown-it, CommonMark + tables) checks what a
reader would see.
"""
from __future__ import annotations

import base64
import copy
import html
import io
import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from PIL import Image

from flows import report
from flows.stages import ORDER

TOXICITY_NOTE = (
    "auto fell back from detoxify: detoxify checkpoint not found at /root/.cache/torch/hub/checkpoints/"
    "toxic_original-c1212f89.ckpt. On a machine with internet run `c2m fetch-detoxify` (it saves the "
    "checkpoint and its config there), or download https://github.com/unitaryai/detoxify/releases/"
    "download/v0.1-alpha/toxic_original-c1212f89.ckpt yourself (`curl -L -o /root/.cache/torch/hub/"
    "checkpoints/toxic_original-c1212f89.ckpt https://github.com/unitaryai/detoxify/releases/download/"
    "v0.1-alpha/toxic_original-c1212f89.ckpt`), or set the config key filter.detoxify_checkpoint to its "
    "path.\ndetoxify's Hugging Face config folder is missing: /root/.cache/torch/hub/detoxify-config/"
    "original has no config.json/tokenizer_config.json (set it with the config key "
    "filter.detoxify_config_dir or env C2M_DETOXIFY_CONFIG_DIR). `c2m fetch-detoxify` saves it there. "
    "By hand: it must hold the base model's config.json and tokenizer files, e.g. for 'original' run "
    "`AutoConfig.from_pretrained('bert-base-uncased').save_pretrained(DIR)` and "
    "`AutoTokenizer.from_pretrained('bert-base-uncased').save_pretrained(DIR)` on a machine with "
    "internet, then set filter.detoxify_config_dir to DIR.")

DISTUTILS = ("distutils (version 3.11.7)\tindex\n/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/"
             "setuptools/_distutils/__init__.py\n\ndistutils\nThe main package for the Python Module "
             "Distribution Utilities.  Normally\nused from a setup script as\n   from distutils.core import "
             "setup\n   setup (...)\n\nPackage Con…")
IMGHDR = ("imghdr\tindex\n/root/.pyenv/versions/3.11.7/lib/python3.11/imghdr.py\nModule Reference\n\n"
          "Recognize image file formats based on their first few bytes.\n\nModules\n\nwarnings\n\n"
          "Functions\nwhat(file, h=None)\n\nData\n__all__ = ['what']")
# what a crawl also brings: markup characters of every kind, a backtick in the source name
HOSTILE = ("- item\n# Not a heading\n*args and **kwargs | a | b |\n<script>alert(1)</script> "
           "use `x` or ``` fences ``` &amp; [link](http://example.com) ![img](sizes.png) 1. one")
HOSTILE_SOURCE = "crawl/a`b|c_d_.html"

SIZES = {"8": [5, 0], "9": [2, 2], "10": [14, 11], "11": [18, 15], "12": [45, 42], "13": [43, 38],
         "14": [28, 28], "15": [24, 24], "16": [16, 16], "17": [4, 4], "18": [3, 3]}
DOCS = {"bytes_in": 2826605, "bytes_out": 2785206, "docs_in": 202, "docs_out": 183, "docs_rejected": 19,
        "partitions": 13, "rejected_by_reason": {}, "rejected_examples": {}, "size_hist": SIZES,
        "slowest_docs": [{"id": "52a99653d815fa18", "seconds": 0.1486, "source": "pydoc:abc"},
                         {"id": "9d72da1fce665d2f", "seconds": 0.0797, "source": "pydoc:sre_compile"}]}
STATS = {
    "source": {"bytes": 8049251, "docs": 202, "partitions": 13,
               "python": {"implementation": "CPython", "python_version": "3.11.7"},
               "skipped": {m: f"exit code 1: ModuleNotFoundError: No module named '{m}'"
                           for m in ("msilib", "msvcrt", "nt", "winreg", "winsound", "_winapi")}},
    "extract": {**DOCS, "bytes_in": 8049251, "bytes_out": 3108556, "docs_out": 202, "docs_rejected": 0},
    "normalize": {**DOCS, "bytes_in": 3108556, "docs_out": 202, "docs_rejected": 0, "docs_changed": 197,
                  "fixes": {"normalize:NFC": 1, "uncurl_quotes": 2, "unescape_html": 11, "whitespace": 197}},
    "holdout": {**DOCS, "bytes_in": 2826605, "bytes_out": 2741586, "docs_out": 191, "docs_rejected": 11,
                "rejected_by_reason": {"eval": 11},
                "eval": {"kind": "split", "docs": 11, "bytes": 85019, "skipped": {}}},
    "filter": {**DOCS, "kept_languages": {"en": 183}, "language_model": "fastText lid.176.ftz",
               "rejected_by_reason": {"c4_punctuation": 2, "gopher_alpha_words": 10,
                                      "gopher_mean_word_length": 2, "gopher_word_count": 5},
               "rejected_examples": {
                   "c4_punctuation": [{"id": "c56397b9d6628a2e", "source": "pydoc:distutils",
                                       "text": DISTUTILS, "value": 0.0}],
                   "gopher_word_count": [{"id": "b84cc59fc10d915e", "source": "pydoc:imghdr",
                                          "text": IMGHDR, "value": 24.0},
                                         {"id": "0000000000000001", "source": HOSTILE_SOURCE,
                                          "text": HOSTILE, "value": 3.0}]},
               "toxicity_model": "alt-profanity-check 1.9.1", "toxicity_note": TOXICITY_NOTE,
               "toxicity_scorer": "profanity-check", "toxicity_threshold": 0.9},
    "dedup": {**DOCS, "bytes_in": 2785206, "docs_in": 183, "docs_rejected": 0},
    "tokenizer": {"heldout": {"bytes": 168164, "bytes_per_token": 3.1784, "docs": 16, "tokens": 52909},
                  "parent_tokenizer": None, "vocab_size": 4096, "vocab_size_note": None},
    "shard": {"train": {"bytes": 2617042, "docs": 167, "shards": ["train_000000.bin"], "tokens": 757792},
              "val": {"bytes": 168164, "docs": 16, "shards": ["val_000000.bin"], "tokens": 52925},
              "vocab_size": 4096},
    "train": {"best_val_loss": 3.3841026999610104, "compile_seconds": None, "dtype": "bfloat16",
              "dtype_reason": "auto: bf16 matmuls ran at 1.88x fp32's speed (AVX512, 256^3)",
              "final_loss": 2.6728776023171164, "initial_loss": 8.338208198547363,
              "mfu": 0.31570229894902097, "mfu_note": None, "n_params": 1325824, "parent": None,
              "peak_flops_source": "measured: 2 threads bf16 matmul 2048^3, median of 5",
              "resumed_from": None, "seconds": 162.23623167000005, "steps": 1100,
              "tokens_per_s": 14522.883219974885, "tokens_seen": 2252800, "val_loss": 3.3841026999610104},
    "evaluate": {"accuracy": 0.4334897094430993, "beats_compressors": [], "beats_unigram": True,
                 "bits_per_byte": 1.536056039260414, "bytes_evaluated": 168026, "checkpoint_step": 1100,
                 "compressors": {"gzip -9": 1.4448240153309606, "xz -9": 1.2710413864520966},
                 "eval": {"docs": 11, "eval_set_bytes": 85019, "bytes": 84890, "step": 1100, "loss": 3.51,
                          "accuracy": 0.42, "tokens": 26010, "bits_per_byte": 1.5871, "tokens_seen": 2252800,
                          "curve": [{"step": 275, "loss": 4.2, "bits_per_byte": 1.91, "tokens_seen": 563200},
                                    {"step": 1100, "loss": 3.51, "bits_per_byte": 1.5871,
                                     "tokens_seen": 2252800}]},
                 "curve": [{"accuracy": 0.322, "bits_per_byte": 1.878, "loss": 4.1376, "step": 275,
                            "top5_accuracy": 0.475},
                           {"accuracy": 0.4335, "bits_per_byte": 1.536, "loss": 3.3841, "step": 1100,
                            "top5_accuracy": 0.5896}],
                 "loss": 3.3841452006160213, "perplexity": 29.492771535222122,
                 "samples": [{"prompt": "", "text": "Read from an I/OTICE and\n' and outputs on the "
                                                    "synchronous type.\n```\n__init__ *x*\n- seek"}],
                 "tokens_evaluated": 52864, "top5_accuracy": 0.589626210653753,
                 "unigram_bits_per_byte": 2.6894065587195257, "unigram_entropy": 5.925136886658173},
}
VERSIONS = {"source": "000c76db64c3", "extract": "83447b796c6e", "normalize": "599e10612fd2",
            "holdout": "5a1e0e7d2c11",
            "filter": "1339b9ee0a23", "dedup": "94b6b65ed4dd", "tokenizer": "b92e81a7434d",
            "shard": "7bd2dc115efc", "train": "93e448c5e96f", "evaluate": "d39127ea1f77"}
MARKDOWN = MarkdownIt("commonmark").enable("table")


def manifest(stage: str, **stats) -> dict:
    previous = ORDER[ORDER.index(stage) - 1] if stage != "source" else None
    return {"stage": stage, "version": VERSIONS[stage], "code_version": "70dc8d8a3328",
            "inputs": {previous: {"stage": previous, "version": VERSIONS[previous]}} if previous else {},
            "config": {stage: {"path": "docs/`odd` name"}}, "started": "2026-12-02T13:58:13.335743+00:00",
            "finished": "2026-12-02T13:58:15.684119+00:00", "duration_s": 2.348,
            "stats": {**copy.deepcopy(STATS[stage]), **stats}}


def visible(markup: str) -> str:
    """What a reader sees of rendered HTML: tags gone, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def test_every_stage_has_a_section_and_a_key_figure(tmp_path):
    assert set(report.HEADLINES) == set(ORDER) == set(report.KEY_FIGURES)
    for stage in ORDER:
        text = report.render(manifest(stage), tmp_path)
        assert text.startswith(f"# {stage} {VERSIONS[stage]}\n")
        assert report.headline(manifest(stage))[0] in text
        assert report.key_figure(manifest(stage))
    assert report.key_figure(manifest("filter")) == "183 of 202 docs kept"
    assert report.key_figure(manifest("tokenizer")) == "vocab 4,096, 3.18 bytes/token"
    assert report.key_figure(manifest("train")) == "1,100 steps, 14,523 tokens/s"
    assert report.key_figure(manifest("evaluate")) == "1.536 val bits/byte, eval 1.587"
    assert report.key_figure(manifest("holdout")) == "eval set 11 docs, 0.09 MB; 191 of 202 docs kept"


def test_document_text_shows_as_written(tmp_path):
    page = MARKDOWN.render(report.render(manifest("filter"), tmp_path))
    items = re.findall(r"<li>(.*?)</li>", page, re.S)

    def example(source: str) -> str:
        (li,) = [li for li in items if visible(li).startswith(source + " ")]
        return li

    # each example reads back exactly, on one line: no bold, no list, no heading, no raw HTML
    for source, text in (("pydoc:distutils", DISTUTILS), ("pydoc:imghdr", IMGHDR)):
        shown = visible(example(source))
        assert shown.endswith(": " + " ".join(text.split())), shown
        assert "<strong>" not in example(source) and "<em>" not in example(source)
    hostile = example(HOSTILE_SOURCE)
    assert visible(hostile) == f'{HOSTILE_SOURCE} {{"value": 3.0}}: ' + " ".join(HOSTILE.split())
    assert not re.search(r"<(strong|em|h\d|script|a|img|ul|ol)\b", hostile)
    assert "__init__.py" in page and "<strong>init</strong>" not in page
    # the tables keep their shape: a `|` in a cell does not add columns
    reasons = re.search(r"<h2>Rejected by reason</h2>\s*<table>(.*?)</table>", page, re.S).group(1)
    assert len(re.findall(r"<tr>", reasons)) == 1 + 4
    assert all(len(re.findall(r"<td>", row)) == 2 for row in re.findall(r"<tr>(.*?)</tr>", reasons, re.S)[1:])
    assert "<td>gopher_mean_word_length</td>" in reasons
    assert "<h1>" not in page.split("</h1>", 1)[1]  # one title, however the text looks


def test_samples_and_config_stay_in_their_code_blocks(tmp_path):
    page = MARKDOWN.render(report.render(manifest("evaluate"), tmp_path))
    blocks = [html.unescape(b) for b in re.findall(r"<pre><code[^>]*>(.*?)</code></pre>", page, re.S)]
    assert STATS["evaluate"]["samples"][0]["text"] + "\n" in blocks  # its ``` does not close the fence
    assert '"path": "docs/`odd` name"' in blocks[-1]
    assert "<h2>Config</h2>" in page


def test_warnings_are_said_once_at_the_top_and_short(tmp_path):
    text = report.render(manifest("filter"), tmp_path)
    head, _, rest = text.partition("- **toxicity scorer: profanity-check**")
    assert rest, "the filter headline is there"
    warning = [line for line in head.splitlines() if line.startswith("> - ")]
    assert len(warning) == 1 and len(warning[0]) < 220, warning
    assert "detoxify" in warning[0] and "`c2m fetch-detoxify`" in warning[0]
    assert text.count("**warnings**") == 1 and "On a machine with internet" not in text
    assert "detoxify checkpoint not found" not in rest
    page = MARKDOWN.render(text)
    assert page.index("<blockquote>") < page.index("toxicity scorer")

    short = "the corpus gave 3,000 of the 4,096 tokens asked for: no more pairs occur 2+ times"
    tok = report.render(manifest("tokenizer", vocab_size=3000, vocab_size_note=short), tmp_path)
    assert tok.count(short) == 1 and tok.index(short) < tok.index("- vocab size: 3,000")
    assert "**warnings**" not in report.render(manifest("tokenizer"), tmp_path)
    assert "**warnings**" not in report.render(manifest("filter", toxicity_note=""), tmp_path)


def test_for_prefect_embeds_the_plots_as_real_pngs(tmp_path):
    text = report.render(manifest("filter"), tmp_path)  # writes sizes.png beside it
    assert "![sizes](sizes.png)" in text  # report.md on disk keeps the relative link
    embedded = report.for_prefect(text, tmp_path)
    assert "![sizes](sizes.png)" not in embedded
    (uri,) = re.findall(r"!\[sizes\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", embedded)
    png = base64.b64decode(uri)
    assert png == (tmp_path / "sizes.png").read_bytes()
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size[0] > 200 and image.size[1] > 100
    # the escaped example text that looks like an image link is text, not an image
    assert re.findall(r'<img src="([^"]{0,22})', MARKDOWN.render(embedded)) == ["data:image/png;base64,"]

    train = report.for_prefect(report.render(manifest("train"), tmp_path), tmp_path)
    assert "loss.png" in train and "](loss.png)" not in train  # no loss.png here: a note, no broken link
    assert "<img" not in MARKDOWN.render(train)
    fenced = "```\n![loss](sizes.png)\n```\n![sizes](sizes.png)"
    assert report.for_prefect(fenced, tmp_path).startswith("```\n![loss](sizes.png)\n```\n![sizes](data:")


def test_a_cache_hit_names_what_was_used_and_who_built_it():
    built = {**manifest("filter"), "built_by": {"flow_run_name": "clever_fox", "flow_run_id": "x"}}
    text = report.cache_hit(built, "quiet-otter", Path("/data/artifacts/filter/1339b9ee0a23"))
    assert text.startswith("# filter 1339b9ee0a23: cache hit\n")
    lines = text.splitlines()
    assert len(lines) <= 8
    assert "quiet-otter" in text and "cache hit" in text and "filter/1339b9ee0a23" in text
    assert r"clever\_fox" in text and "2026-12-02 13:58" in text and "2.3 s" in text
    assert "183 of 202 docs kept" in text
    assert "`/data/artifacts/filter/1339b9ee0a23/report.md`" in text
    unknown = report.cache_hit(manifest("train"), None, Path("artifacts/train/93e448c5e96f"), "pinned")
    assert unknown.startswith("# train 93e448c5e96f: pinned\n")
    assert "built by" not in unknown and "This run used train/93e448c5e96f" in unknown
    assert "1,100 steps, 14,523 tokens/s" in unknown


def test_the_summary_table_has_a_row_and_a_link_per_stage():
    rows = [{"stage": stage, "version": VERSIONS[stage], "status": "built" if stage == "train" else "cached",
             "duration_s": 164.93 if stage == "train" else 0.01, "key": report.key_figure(manifest(stage)),
             "link": None if stage == "shard" else f"http://127.0.0.1:4200/artifacts/key/{stage}-report",
             "why": "train.max_steps: 100 -> 1100" if stage == "train" else ""}
            for stage in ORDER]
    page = MARKDOWN.render(report.summary(rows))
    table = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    assert len(table) == 1 + len(ORDER)
    cells = [[visible(c) for c in re.findall(r"<td>(.*?)</td>", row, re.S)] for row in table[1:]]
    assert [c[0] for c in cells] == ORDER
    by_stage = {c[0]: c for c in cells}
    assert by_stage["train"] == ["train", "93e448c5e96f", "built", "2 min 45 s",
                                 "1,100 steps, 14,523 tokens/s", "report", "train.max_steps: 100 -> 1100"]
    assert by_stage["filter"][2:5] == ["cached", "0.0 s", "183 of 202 docs kept"]
    assert by_stage["shard"][5] == ""
    assert 'href="http://127.0.0.1:4200/artifacts/key/evaluate-report"' in page
    assert "1 built" in page and "9 cached" in page


@pytest.mark.parametrize("steps", [[0, 3], [275, 550, 825, 1100]])
def test_val_curve_ticks_are_whole_steps(tmp_path, monkeypatch, steps):
    from matplotlib.figure import Figure

    from trainer.evaluate import plot_curve

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    records = [{"step": s, "loss": 4.0 - i / 2, "bits_per_byte": 1.9 - i / 10} for i, s in enumerate(steps)]
    plot_curve(records, tmp_path / "val_curve.png", {"gzip -9": 1.44})
    (fig,) = figures
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
