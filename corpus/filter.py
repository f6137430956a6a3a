"""The filter step: length bounds, heuristic quality rules, language, toxicity.

Cheapest first: a document is measured by the next check only if the earlier ones kept
it, and toxicity (a model) scores the survivors in batches. Every kept document gets
`language` / `language_score` (when a language model is available) and `toxicity`.
"""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator

from corpus.documents import Rejected
from corpus.language import load_language_model
from corpus.quality import quality_checker
from corpus.toxicity import load_scorer

SCORE_BATCH_DOCS = 256  # documents held at once while their toxicity is scored


def length_reason(text: str, *, min_chars: int, max_chars: int, min_words: int,
                  max_words: int) -> str | None:
    n_chars = len(text)
    if n_chars < min_chars:
        return "too_few_chars"
    if n_chars > max_chars:
        return "too_many_chars"
    n_words = len(text.split())
    if n_words < min_words:
        return "too_few_words"
    if n_words > max_words:
        return "too_many_words"
    return None


def filter_docs(docs: Iterable[dict], *, min_chars: int, max_chars: int, min_words: int,
                max_words: int, quality: dict, languages: list[str], language_min_score: float,
                language_model: str, scorer_kind: str, scorer_args: dict,
                toxicity_threshold: float) -> Iterator[dict | Rejected]:
    """`quality`: the [quality] config (corpus.quality); `languages`: ISO codes to keep
    (empty: keep all, label only); models load once per worker process (cached)."""
    quality_reason = quality_checker(quality)
    identify = load_language_model(language_model)
    scorer = load_scorer(scorer_kind, **scorer_args)
    docs = iter(docs)
    while batch := list(islice(docs, SCORE_BATCH_DOCS)):
        survivors = []
        for doc in batch:
            text = doc["text"]
            reason = length_reason(text, min_chars=min_chars, max_chars=max_chars,
                                   min_words=min_words, max_words=max_words)
            if reason:
                yield Rejected(doc, reason)
                continue
            failure = quality_reason(text)
            if failure:
                yield Rejected(doc, *failure)
                continue
            if identify:
                doc["language"], doc["language_score"] = identify.predict(text)
                if languages and (doc["language"] not in languages
                                  or doc["language_score"] < language_min_score):
                    yield Rejected(doc, "language", {"language": doc["language"],
                                                     "value": doc["language_score"]})
                    continue
            survivors.append(doc)
        scores = scorer.score([d["text"] for d in survivors]) if scorer else [None] * len(survivors)
        for doc, score in zip(survivors, scores):
            doc["toxicity"] = score
            if score is not None and score >= toxicity_threshold:
                yield Rejected(doc, "toxic", {"toxicity": score})
            else:
                yield doc
