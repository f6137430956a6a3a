"""The artifact store: `<root>/<stage>/<version>/` folders, written atomically.

A version is a content hash of the stage name, its config, its code version and the
versions of its inputs, so the same inputs and config give the same version and the
stage can be skipped. A version folder is complete exactly when it has manifest.json:
a stage writes into a temporary sibling and renames it into place at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "LATEST"
TMP_PREFIX = ".tmp-"


def content_version(stage: str, config: dict, code_version: str,
                    inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": stage, "config": config, "code": code_version,
                       "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, stage: str, version: str) -> Path:
        return self.root / stage / version

    def exists(self, stage: str, version: str) -> bool:
        return (self.path(stage, version) / MANIFEST).is_file()

    def manifest(self, stage: str, version: str) -> dict:
        path = self.path(stage, version) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no complete artifact {stage}/{version} under {self.root} "
                                    f"(`c2m ls {stage}` lists the versions there are)")
        return json.loads(path.read_text())

    def latest(self, stage: str) -> str | None:
        pointer = self.root / stage / LATEST
        if not pointer.is_file():
            return None
        version = pointer.read_text().strip()
        return version if self.exists(stage, version) else None

    def resolve(self, stage: str, version: str | None = None) -> str:
        """A version given in full or as a unique prefix, or the latest one."""
        if not version:
            latest = self.latest(stage)
            if latest is None:
                raise FileNotFoundError(f"stage {stage!r} has no artifact under {self.root} yet; "
                                        f"run it first (`c2m stage {stage}`)")
            return latest
        matches = [v for v in self.versions(stage) if v.startswith(version)]
        if len(matches) != 1:
            raise FileNotFoundError(f"{stage}/{version}: {len(matches)} versions match under "
                                    f"{self.root}; `c2m ls {stage}` lists them")
        return matches[0]

    def stages(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def versions(self, stage: str) -> list[str]:
        """Complete versions of a stage, oldest first."""
        folder = self.root / stage
        if not folder.is_dir():
            return []
        done = [p for p in folder.iterdir() if (p / MANIFEST).is_file()]
        return [p.name for p in sorted(done, key=lambda p: (p / MANIFEST).stat().st_mtime)]

    def begin(self, stage: str, version: str) -> Path:
        """A fresh temporary folder beside where the version will live."""
        tmp = self.root / stage / f"{TMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        return tmp

    def work_dir(self, stage: str, version: str) -> Path:
        """Scratch for one version that outlives a failed build (never read as an artifact)."""
        return self.root / stage / f"{TMP_PREFIX}work-{version}"

    def commit(self, tmp: Path, stage: str, version: str, manifest: dict) -> Path:
        """Checksum the files, write the manifest last, rename into place, move LATEST."""
        manifest = dict(manifest, stage=stage, version=version, files={
            str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(tmp.rglob("*")) if p.is_file()
        })
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        final = self.path(stage, version)
        if final.exists():  # a forced re-run of the same version: swap the old one out
            old = final.with_name(f"{TMP_PREFIX}old-{version}-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        self.set_latest(stage, version)
        return final

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def set_latest(self, stage: str, version: str) -> None:
        pointer = self.root / stage / LATEST
        tmp = pointer.with_name(f"{LATEST}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(version + "\n")
        os.replace(tmp, pointer)

    def lineage(self, stage: str, version: str) -> list[tuple[str, str]]:
        """This artifact and everything it was built from, depth first."""
        seen: list[tuple[str, str]] = []

        def walk(s: str, v: str) -> None:
            if (s, v) in seen:
                return
            seen.append((s, v))
            for inp in self.manifest(s, v).get("inputs", {}).values():
                walk(inp["stage"], inp["version"])

        walk(stage, version)
        return seen
