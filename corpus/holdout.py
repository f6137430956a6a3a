"""The fixed eval set, held out before any filtering, and kept out of training.

Every data variant of a comparison is scored on the same eval documents, so they are
taken before the stages a variant changes (filter, dedup): right after normalize. The
eval set is one of
- split: the source documents whose id hash falls in the top `fraction` of the hash
  range (val takes the bottom, so the two never correlate);
- path: your own file or folder of documents, read like source.path;
- pydoc: the pydoc pages of a fixed list of standard-library modules.
Training candidates whose id is an eval document's, or whose text is the same up to
case and whitespace (dedup's exact hash), are held out too: "eval" and "eval_overlap".
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from corpus import sources
from corpus.dedup import text_hash
from corpus.documents import Rejected, hash_bucket, read_docs
from corpus.extract import extract
from corpus.normalize import normalize

# Mid-sized, stable pages: prose and code, present in every CPython 3.x.
PYDOC_EVAL_MODULES = ["bisect", "calendar", "csv", "fractions", "heapq", "statistics",
                      "string", "textwrap"]


@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class HoldoutConfig:
    """The eval set every variant is scored on (bits per byte), held out before filtering."""
    kind: Literal["split", "path", "pydoc"] = Field("split", description=(
        "split: a share of the source documents by id hash | path: your own documents | "
        "pydoc: the pages of pydoc_modules"))
    fraction: float = Field(0.02, gt=0, lt=0.5, description="kind=split: share of documents held out")
    path: str = Field("", description=(
        "kind=path: a file or folder of documents (as source.path); its files' contents, "
        "not the path, make the version"))
    pydoc_modules: list[str] = Field(default_factory=lambda: list(PYDOC_EVAL_MODULES),
                                     description="kind=pydoc: standard-library modules")

    UNVERSIONED: ClassVar[tuple[str, ...]] = ("path",)

    @model_validator(mode="after")
    def _needs(self):
        if self.kind == "path" and not self.path:
            raise ValueError("kind = 'path' needs path = the file or folder of eval documents")
        if self.kind == "pydoc" and not self.pydoc_modules:
            raise ValueError("kind = 'pydoc' needs at least one module in pydoc_modules")
        return self


def in_eval_split(id_: str, fraction: float) -> bool:
    """The top `fraction` of the id-hash range (val uses the bottom: see is_val)."""
    return hash_bucket(id_) >= (1 - fraction) * 2**64


def split_eval_docs(path: str | Path, fraction: float) -> list[dict]:
    """The eval-split documents of one partition: {id, source, text}."""
    return [{"id": row["id"], "source": row["source"], "text": row["text"]}
            for row in read_docs(path, ["id", "source", "text"]) if in_eval_split(row["id"], fraction)]


def external_eval_docs(cfg: HoldoutConfig, skipped: dict) -> Iterator[dict]:
    """kind=path or pydoc: the documents through the same extract and normalize steps as
    the corpus; those the steps reject are counted in `skipped` {reason: n}, not used."""
    if cfg.kind == "pydoc":
        raw = sources.pydoc_documents(modules=cfg.pydoc_modules, skipped=skipped)
    else:
        raw = sources.path_documents(cfg.path, skipped=skipped)
    for item in normalize(_passed(extract(raw), skipped)):
        if isinstance(item, Rejected):
            skipped[item.reason] = skipped.get(item.reason, 0) + 1
        else:
            yield {"id": item["id"], "source": item["source"], "text": item["text"]}


def _passed(items: Iterable[dict | Rejected], skipped: dict) -> Iterator[dict]:
    for item in items:
        if isinstance(item, Rejected):
            skipped[item.reason] = skipped.get(item.reason, 0) + 1
        else:
            yield item


def hold_out(docs: Iterable[dict], *, eval_ids: frozenset[str],
             eval_hashes: dict[str, str]) -> Iterator[dict | Rejected]:
    """Step: eval documents out ("eval"), and documents with an eval document's text up to
    case and whitespace ("eval_overlap", duplicate_of = that eval id); the rest pass."""
    for doc in docs:
        if doc["id"] in eval_ids:
            yield Rejected(doc, "eval")
        elif (twin := eval_hashes.get(text_hash(doc["text"]))) is not None:
            yield Rejected(doc, "eval_overlap", {"duplicate_of": twin})
        else:
            yield doc
