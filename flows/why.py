"""`c2m why`: one document's path through a run, read from the stages' indexes.

For each document stage, in order: kept (with its length there), or dropped with the
reason and the measured value, or a duplicate of which document with what similarity,
or held out for the eval set; it stops after the stage that dropped it. For a kept
document, the shard file(s) and token range its tokens are in, and the split.

Nothing here imports the stages (they bring torch): the order of stages comes from
the artifacts' own lineage, so a stage added to the DAG needs no change here.
"""
from __future__ import annotations

from pathlib import Path

from corpus.documents import doc_id
from corpus.index import INDEX_FILE, DocumentIndex, IndexMissing, TokenIndex, index_kind
from flows.store import ArtifactStore

SAMPLE_CHARS = 600
DETAILS = ["reason", "value", "duplicate_of", "similarity", "toxicity", "language", "error", "text"]


# -- which versions ----------------------------------------------------------------

def choose_versions(store: ArtifactStore, run: str | None = None,
                    pins: dict[str, str] | None = None) -> dict[str, str]:
    """{stage: version}: a recorded run's, or the pinned versions and their lineage (and
    the newest versions downstream built from them), or by default the LATEST of the
    most downstream stage and its lineage, so every version is one the others were
    built from or into."""
    if run:
        return dict(store.run_record(run)["versions"])
    chosen: dict[str, str] = {}
    if pins:
        for stage, version in pins.items():
            _add_lineage(store, chosen, stage, store.resolve(stage, version))
    else:
        lineages = [store.lineage(s, store.latest(s)) for s in store.stages() if store.latest(s)]
        # a stage whose lineage holds one stage twice (a comparison of runs) is no run
        runs = [line for line in lineages if len({s for s, _ in line}) == len(line)]
        if not runs:
            raise FileNotFoundError(f"no artifacts under {store.root} yet (`c2m run` builds them)")
        _add_lineage(store, chosen, *max(runs, key=len)[0])
    return _downstream(store, chosen)


def _add_lineage(store: ArtifactStore, chosen: dict[str, str], stage: str, version: str) -> None:
    for s, v in store.lineage(stage, version):
        if chosen.setdefault(s, v) != v:
            raise ValueError(f"the pins disagree: {stage}/{version} was built from {s}/{v}, "
                             f"another pin from {s}/{chosen[s]}")


def _downstream(store: ArtifactStore, chosen: dict[str, str]) -> dict[str, str]:
    """Add, for each stage not chosen, its newest version built only from chosen ones."""
    added = True
    while added:
        added = False
        for stage in store.stages():
            if stage in chosen:
                continue
            latest = store.latest(stage)
            newest_first = [latest] * bool(latest) + [v for v in reversed(store.versions(stage)) if v != latest]
            for version in newest_first:
                inputs = store.manifest(stage, version).get("inputs", {}).values()
                if inputs and all(chosen.get(i["stage"]) == i["version"] for i in inputs):
                    chosen[stage], added = version, True
                    break
    return chosen


def in_order(store: ArtifactStore, versions: dict[str, str]) -> list[tuple[str, str]]:
    """The chosen versions upstream first: a stage comes after everything it was built from."""
    depth: dict[str, int] = {}

    def deep(stage: str) -> int:
        if stage not in depth:
            inputs = store.manifest(stage, versions[stage]).get("inputs", {}).values()
            depth[stage] = 1 + max((deep(i["stage"]) for i in inputs if i["stage"] in versions), default=0)
        return depth[stage]

    return sorted(versions.items(), key=lambda sv: (deep(sv[0]), sv[0]))


def _indexed(store: ArtifactStore, versions: dict[str, str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(document stages, token stages) among the versions, in order. A document stage
    without an index is an error naming the fix."""
    documents, tokens = [], []
    for stage, version in in_order(store, versions):
        folder = store.path(stage, version)
        index = _index_copy(store, stage, version)
        kind = index and index_kind(index)
        if kind is None and any((folder / sub).is_dir() for sub in ("docs", "rejected")):
            raise IndexMissing(
                f"{stage}/{version} has no index.sqlite (it was built before `c2m why` indexes "
                f"existed); rebuild it with `c2m run --stage {stage} --force` and the config that built it")
        if kind == "documents":
            documents.append((stage, version))
        elif kind == "tokens":
            tokens.append((stage, version))
    if not documents:
        raise FileNotFoundError(f"no document stage among {', '.join(f'{s}/{v}' for s, v in versions.items())}")
    return documents, tokens


def _index_copy(store: ArtifactStore, stage: str, version: str) -> Path | None:
    """The local folder holding the version's index.sqlite (SQLite reads local files: on a
    remote store, a cached copy of that one file); None if the version has no index."""
    if INDEX_FILE not in store.manifest(stage, version).get("files", {}):
        return None
    return store.local(stage, version, [INDEX_FILE])


def _documents(store: ArtifactStore, stage: str, version: str) -> DocumentIndex:
    return DocumentIndex(store.path(stage, version), _index_copy(store, stage, version) / INDEX_FILE)


# -- one document ------------------------------------------------------------------

def why(store: ArtifactStore, doc: str, versions: dict[str, str]) -> list[dict]:
    """The document's verdict at each stage of `versions`, upstream first. `doc` is a
    document id, or the source path or URL it was read from."""
    documents, tokens = _indexed(store, versions)
    first, first_version = documents[0]
    source = _documents(store, first, first_version)
    id_ = _resolve(store, source, doc, first, first_version)
    verdicts = []
    for stage, version in documents:
        index = source if stage == first else _documents(store, stage, version)
        entry = index.get(id_)
        if entry is None:
            verdicts.append({"stage": stage, "version": version, "id": id_, "verdict": "absent"})
            break
        verdicts.append(_verdict(index, entry, stage, version, source))
        if not entry.kept:
            break  # later stages never saw it
    for stage, version in tokens:  # held-out documents may be tokenized too (an eval set)
        span = TokenIndex(_index_copy(store, stage, version)).get(id_)
        if span is not None:
            verdicts.append({"stage": stage, "version": version, "id": id_, "verdict": span.split,
                             "split": span.split, "offset": span.offset, "tokens": span.length,
                             "files": [{"file": f, "start": a, "end": b} for f, a, b in span.files],
                             "folder": str(store.path(stage, version))})
        elif verdicts[-1]["verdict"] == "kept" and verdicts[-1]["stage"] == documents[-1][0]:
            verdicts.append({"stage": stage, "version": version, "id": id_, "verdict": "absent"})
    return verdicts


def _resolve(store: ArtifactStore, source: DocumentIndex, doc: str, stage: str, version: str) -> str:
    """The id of `doc`: an id as is, a source path or URL as stored, a path on this
    machine under the folder the corpus was read from, or an id derived from a source."""
    if source.get(doc):
        return doc
    candidates = [doc]
    read_from = (store.manifest(stage, version).get("stats") or {}).get("path")
    if read_from:
        try:
            candidates.append(Path(doc).expanduser().resolve().relative_to(read_from).as_posix())
        except ValueError:
            pass  # not under the corpus folder
    for candidate in candidates:
        ids = source.ids_for_source(candidate)
        if len(ids) > 1:
            raise ValueError(f"{len(ids)} documents in {stage}/{version} were read from {candidate!r} "
                             f"({', '.join(ids[:5])}); name one by its id")
        if ids:
            return ids[0]
    if source.get(doc_id(doc)):
        return doc_id(doc)
    raise ValueError(f"not in {stage}/{version}: {doc!r} is no document id, source path or URL there")


def _verdict(index: DocumentIndex, entry, stage: str, version: str, source: DocumentIndex) -> dict:
    out = {"stage": stage, "version": version, "id": entry.id, "partition": entry.partition,
           "row": entry.row, "folder": str(index.folder)}
    if entry.source is not None:
        out["source"] = entry.source
    if entry.kept:
        row = index.read(entry, ["n_chars"])
        return {**out, "verdict": "kept", "chars": row.get("n_chars")}
    row = index.read(entry, DETAILS)
    text = row.pop("text", None)
    details = {k: v for k, v in row.items() if v is not None}
    out.update(details, chars=None if text is None else len(text))
    if entry.reason.startswith("eval"):
        out["verdict"] = "held_out"
    elif details.get("duplicate_of"):
        out["verdict"] = "duplicate"
        kept = source.get(details["duplicate_of"])  # where the copy that stayed came from
        out["duplicate_source"] = kept.source if kept else None
    else:
        out["verdict"] = "dropped"
    return out


def render(verdicts: list[dict]) -> str:
    """One line per stage: `stage version  verdict`, upstream first."""
    head = verdicts[0]
    lines = [f"document {head['id']}" + (f"  ({head['source']})" if head.get("source") else "")]
    for v in verdicts:
        lines.append(f"  {v['stage']:<10} {v['version']:<12}  {_describe(v)}")
    return "\n".join(lines)


def _describe(v: dict) -> str:
    where = f"  [{v['partition']} row {v['row']}]" if "partition" in v else ""
    chars = "" if v.get("chars") is None else f", {v['chars']:,} chars"
    verdict = v["verdict"]
    if verdict == "absent":
        return "not in this version (its index has no such id)"
    if verdict == "kept":
        return ("read" if v.get("chars") is None and "source" in v else "kept") + chars + where
    if verdict == "dropped":
        value = f" (value {_number(v['value'])})" if v.get("value") is not None else ""
        extra = "".join(f", {k} {_number(v[k])}" for k in ("toxicity", "language", "error") if v.get(k) is not None)
        return f"dropped: {v['reason']}{value}{extra}; it had{chars.lstrip(',') or ' no text'}{where}"
    if verdict == "duplicate":
        of = v["duplicate_of"] + (f" ({v['duplicate_source']})" if v.get("duplicate_source") else "")
        similarity = f", similarity {v['similarity']:.3f}" if v.get("similarity") is not None else ""
        return f"{v['reason'].replace('_', ' ')} of {of}{similarity}; dropped{chars}{where}"
    if verdict == "held_out":
        twin = f", same text as eval document {v['duplicate_of']}" if v.get("duplicate_of") else ""
        return f"held out for the eval set ({v['reason']}{twin}){chars}{where}"
    files = ", ".join(f"{f['file']} tokens {f['start']:,}-{f['end']:,}" for f in v["files"])
    return f"{v['split']}: {files} ({v['tokens']:,} tokens; split offset {v['offset']:,})"


def _number(x) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


# -- documents dropped for a reason ------------------------------------------------

def sample(store: ArtifactStore, reason: str, versions: dict[str, str], n: int = 3) -> list[dict]:
    """Up to n documents some stage of `versions` dropped for `reason`, each with the
    text that stage received (truncated to SAMPLE_CHARS)."""
    documents, _ = _indexed(store, versions)
    present: dict[str, list[str]] = {}
    found: list[dict] = []
    for stage, version in documents:
        counts = (store.manifest(stage, version).get("stats") or {}).get("rejected_by_reason") or {}
        for r, count in counts.items():
            present.setdefault(r, []).append(f"{stage} {count}")
        if reason not in counts or len(found) >= n:
            continue
        index = _documents(store, stage, version)
        for entry in index.rejected(reason, n - len(found)):
            row = index.read(entry, [*DETAILS, "source"])
            text = row.pop("text", None) or ""
            found.append({"stage": stage, "version": version, "id": entry.id,
                          **{k: v for k, v in row.items() if v is not None},
                          "chars": len(text), "text": _truncate(text)})
    if not found:
        listed = "; ".join(f"{r} ({', '.join(where)})" for r, where in sorted(present.items())) or "none"
        raise ValueError(f"no document was dropped for {reason!r} in these versions; "
                         f"reasons there: {listed}")
    return found


def _truncate(text: str) -> str:
    text = text.strip()
    if len(text) <= SAMPLE_CHARS:
        return text
    cut = text.rfind(" ", 0, SAMPLE_CHARS)
    head = text[:cut if cut > SAMPLE_CHARS // 2 else SAMPLE_CHARS]
    return f"{head} … [{len(text) - len(head):,} more chars]"


def render_sample(found: list[dict]) -> str:
    blocks = []
    for d in found:
        details = ", ".join(f"{k} {_number(d[k])}" for k in ("value", "duplicate_of", "similarity",
                                                            "toxicity", "language", "error") if k in d)
        head = (f"{d['stage']}/{d['version']}  {d['id']}  {d.get('source', '')}\n"
                f"  {d['reason']}{f' ({details})' if details else ''}; the text {d['stage']} received, "
                f"{d['chars']:,} chars:")
        body = "\n".join(f"  | {line}" for line in (d["text"] or "(empty)").splitlines())
        blocks.append(f"{head}\n{body}")
    return "\n\n".join(blocks)
