"""Length and toxicity filters: keep documents within bounds and below the threshold."""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Iterator

from corpus.documents import Rejected
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


def filter_docs(docs: Iterable[dict], *, scorer_kind: str, scorer_args: dict,
                toxicity_threshold: float, min_chars: int, max_chars: int, min_words: int,
                max_words: int) -> Iterator[dict | Rejected]:
    """The step. Length first (cheap), then toxicity on the survivors, in batches.
    The scorer is loaded here, once per worker process (load_scorer caches it)."""
    scorer = load_scorer(scorer_kind, **scorer_args)
    docs = iter(docs)
    while batch := list(islice(docs, SCORE_BATCH_DOCS)):
        survivors = []
        for doc in batch:
            reason = length_reason(doc["text"], min_chars=min_chars, max_chars=max_chars,
                                   min_words=min_words, max_words=max_words)
            if reason:
                yield Rejected(doc, reason, {"toxicity": None})
            else:
                survivors.append(doc)
        scores = scorer.score([d["text"] for d in survivors]) if scorer else [None] * len(survivors)
        for doc, score in zip(survivors, scores):
            doc["toxicity"] = score
            if score is not None and score >= toxicity_threshold:
                yield Rejected(doc, "toxic", {"toxicity": score})
            else:
                yield doc
