"""The artifact store: `<root>/<stage>/<version>/` on a local folder or any fsspec URL.

A version is a content hash of the stage name, its config, its code version and the
versions of its inputs, so the same inputs and config give the same version and the
stage can be skipped. A version is complete exactly when it has manifest.json, written
last: the manifest is the commit marker, and readers trust nothing else. On a local
folder a stage writes into a temporary sibling and renames it into place at the end. An
object store has no rename: there the stage writes under the version's own prefix, and
until its manifest is there that prefix is invisible (`versions`, `exists`, `resolve`
skip it) and is cleaned up by the next builder or `c2m gc`.

Only the holder of a version's lease builds it (see Lease), so two runs never write into
the same place. The lease uses only operations an object store also has (create a file
if absent, read, list, delete, rewrite), so the protocol is the same on both.

Files that only local-file APIs can read (tokenizer.json, token shards, checkpoints,
SQLite indexes) are read from a local copy of their version (`local`), downloaded once
and checked against the manifest's sha256; Parquet partitions are read where they are,
so Dask workers on other machines never need the driver's disk.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil  # comes with dask.distributed
from upath import UPath

from corpus.documents import is_remote, open_partition
from flows.config import STATE

MANIFEST = "manifest.json"
LATEST = "LATEST"
RUNS = "runs"              # <root>/runs/<flow run name>.json: the versions a run used
TMP_PREFIX = ".tmp-"       # .tmp-<version>-<lease token>[-old] and .tmp-work-<version>
LEASE_PREFIX = ".lease-"   # .lease-<version>.<generation>
HEARTBEAT_S = 10.0         # a lease holder touches its lease this often
STALE_S = 120.0            # a lease from another machine not touched for this long is dead
POLL_S = 1.0               # how often a waiting run looks at the lease again


def content_version(stage: str, config: dict, code_version: str,
                    inputs: dict[str, str]) -> str:
    blob = json.dumps({"stage": stage, "config": config, "code": code_version,
                       "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def store_root(root: str | Path) -> Path:
    """A local folder (a path or file://) as a resolved Path; any other fsspec URL
    (s3://bucket/prefix, gs://...) as a UPath over that filesystem."""
    text = str(root)
    if "://" in text and not text.startswith("file://"):
        # no cached listings: leases and versions are read to see what others changed
        return UPath(text, use_listings_cache=False)
    return Path(text.removeprefix("file://")).expanduser().resolve()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def folder_bytes(path: Path) -> int:
    if is_remote(path):
        return path.fs.du(path.path) if path.exists() else 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                pass
    return total


# -- who holds a lease, and is it still alive -----------------------------------------

def _me() -> dict:
    me = psutil.Process()
    return {"pid": me.pid, "host": socket.gethostname(), "boot": psutil.boot_time(),
            "pid_start": me.create_time()}


def _process_alive(pid: int, started: float | None) -> bool:
    """Whether the process that started at `started` still runs (a reused pid does not count)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped
            return False
        return started is None or abs(proc.create_time() - started) < 1
    except psutil.NoSuchProcess:
        return False


def _mtime(info: dict) -> float:
    """Modification time from an fsspec listing entry (local: mtime; S3: LastModified)."""
    when = info.get("mtime", info.get("LastModified", info.get("updated", 0)))
    return when.timestamp() if hasattr(when, "timestamp") else float(when or 0)


def holder_text(info: dict | None) -> str:
    if not info:
        return "an unknown run"
    run = f", flow run {info['run']}" if info.get("run") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{run}"


def lease_dead(info: dict | None, age_s: float) -> str | None:
    """Why the lease's holder is gone, or None while it may still be working. On its own
    machine a process's death is certain at once; elsewhere only silence tells."""
    if info and info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        if info.get("boot") and abs(info["boot"] - psutil.boot_time()) > 1:
            return "its machine has restarted since"
        if not _process_alive(info["pid"], info.get("pid_start")):
            return "its process is gone"
        return None
    if age_s > STALE_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


def _read_lease(path: Path) -> tuple[dict | None, float] | None:
    """(holder info or None if unreadable, seconds since its last heartbeat); None if absent."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text), age
    except ValueError:  # being written right now (or torn by a crash)
        return None, age


class LeaseLost(RuntimeError):
    """Another run took over the lease of a version this run was building."""


class Lease:
    """The right to build one stage version, held by one process at a time.

    A lease is a file `<stage>/.lease-<version>.<generation>` created only if absent and
    holding the holder's pid, host and start time; the holder touches it every
    HEARTBEAT_S. The highest generation is the lease. A run that finds a live holder waits
    until the lease is released; one that finds a dead holder (same machine: process gone;
    another machine: no heartbeat for STALE_S) takes over by creating the next generation,
    which only one run can do. A holder checks before it commits that the lease is still
    its own. The version's temporary folders carry the lease token, so the store can tell
    whose they are.
    """

    def __init__(self, store: ArtifactStore, stage: str, version: str,
                 log: Callable[[str], None] = print, run: str | None = None):
        self.store, self.stage, self.version, self.log = store, stage, version, log
        self.token = uuid.uuid4().hex[:8]
        self.info = {**_me(), "token": self.token, "stage": stage, "version": version,
                     "run": run, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.path: Path | None = None
        self.waited_for: str | None = None   # whom this run waited for, if anyone
        self.took_over: str | None = None    # whose dead lease this run took over
        self.lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _generations(self) -> dict[int, Path]:
        folder, prefix = self.store.root / self.stage, f"{LEASE_PREFIX}{self.version}."
        found = {}
        for p in folder.glob(f"{prefix}*"):
            if p.name[len(prefix):].isdigit():
                found[int(p.name[len(prefix):])] = p
        return found

    def _create(self, path: Path) -> bool:
        """Create the lease file if absent (on S3 a conditional PUT, If-None-Match)."""
        data = json.dumps(self.info)
        try:
            if is_remote(path):
                path.fs.pipe_file(path.path, data.encode(), mode="create")
                return True
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return True

    def acquire(self, wait: bool = True) -> Lease | None:
        """Take the lease, waiting while a live run holds it (or, without wait, return
        None then). A dead holder's lease is taken over."""
        name = f"{self.stage}/{self.version}"
        (self.store.root / self.stage).mkdir(parents=True, exist_ok=True)
        began, waiting_for = time.monotonic(), None
        while True:
            generations = self._generations()
            target, dead = 0, None
            if generations:
                top = max(generations)
                seen = _read_lease(generations[top])
                if seen is None:
                    continue  # released just now
                holder, age = seen
                dead = lease_dead(holder, age)
                if dead is None:
                    if not wait:
                        return None
                    if holder_text(holder) != waiting_for:
                        waiting_for = holder_text(holder)
                        since = f" since {holder['started']}" if holder and holder.get("started") else ""
                        self.log(f"{self.stage}: waiting for {name}: {waiting_for} is building it{since}")
                    time.sleep(POLL_S)
                    continue
                target = top + 1
            path = self.store.root / self.stage / f"{LEASE_PREFIX}{self.version}.{target}"
            if not self._create(path):
                continue  # another run got this generation first: look again
            self.path = path
            for gen, old in generations.items():  # the dead generations below ours
                if gen < target:
                    old.unlink(missing_ok=True)
            if dead:
                self.took_over = f"{holder_text(holder)} ({dead})"
                self.log(f"{self.stage}: took over the lease on {name} from {self.took_over}")
            if waiting_for:
                self.waited_for = waiting_for
                self.log(f"{self.stage}: waited {time.monotonic() - began:.1f} s for {waiting_for}")
            self._beat = threading.Thread(target=self._heartbeat, daemon=True,
                                          name=f"lease {name}")
            self._beat.start()
            return self

    def problem(self) -> str | None:
        """Why this lease is no longer ours, or None."""
        seen = _read_lease(self.path)
        if seen is None or (seen[0] or {}).get("token") != self.token:
            return "its lease file was removed or replaced"
        for gen, path in self._generations().items():
            if gen > int(self.path.name.rsplit(".", 1)[1]):
                other = _read_lease(path)
                if other and lease_dead(*other) is None:
                    return f"{holder_text(other[0])} took it over"
        return None

    def confirm(self) -> None:
        """Raise LeaseLost unless this run still holds the lease (call before committing)."""
        self.lost = self.lost or self.problem()
        if self.lost:
            raise LeaseLost(f"{self.stage}/{self.version}: this run lost its lease while building "
                            f"({self.lost}); not committing its result")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.lost = self.problem()
            if self.lost:
                return
            try:
                if is_remote(self.path):  # an object's time changes only by rewriting it
                    self.path.write_text(json.dumps(self.info))
                else:
                    os.utime(self.path)
            except OSError:
                pass  # checked again on the next beat

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.path is not None:
            seen = _read_lease(self.path)
            if seen is not None and (seen[0] or {}).get("token") == self.token:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass
class Temporary:
    """A temporary folder (or a lease file) in the store and who owns it."""
    stage: str
    path: Path
    kind: str               # build | work | lease
    version: str
    owner: dict | None      # the lease holder it belongs to, if any is known
    alive: bool             # its owner is still working
    why: str                # owner state in words
    bytes: int

    def describe(self) -> str:
        what = {"build": "build folder", "work": "resumable work folder", "lease": "lease"}[self.kind]
        return (f"{self.stage}/{self.path.name}  {human_bytes(self.bytes)}  {what} of "
                f"{holder_text(self.owner) if self.owner else 'no known run'}: {self.why}")


@dataclass
class Build:
    """Where a leased version is being built.

    `out` is where its files go: a temporary folder beside the version on a local store,
    the version's own prefix on an object store (Dask workers write partitions there).
    `local` is a local folder for files written with local-file APIs (tokenizer.json,
    shards, checkpoints, SQLite, plots); `commit` brings them into the version. On a
    local store the two are the same folder."""
    lease: Lease
    out: Path
    local: Path


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = store_root(root)
        self.remote = is_remote(self.root)
        # local copies of a remote store's versions, one folder per store URL
        self.cache = STATE / "cache" / hashlib.sha256(str(self.root).encode()).hexdigest()[:12]

    def path(self, stage: str, version: str) -> Path:
        """Where the version lives: a local folder, or a UPath on a remote store."""
        return self.root / stage / version

    def exists(self, stage: str, version: str) -> bool:
        return (self.path(stage, version) / MANIFEST).is_file()

    def manifest(self, stage: str, version: str) -> dict:
        path = self.path(stage, version) / MANIFEST
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no complete artifact {stage}/{version} under {self.root} "
                                    f"(`c2m ls {stage}` lists the versions there are)") from None

    def latest(self, stage: str) -> str | None:
        pointer = self.root / stage / LATEST
        try:
            version = pointer.read_text().strip()
        except FileNotFoundError:
            return None
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
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and p.name != RUNS)

    def versions(self, stage: str) -> list[str]:
        """Complete versions of a stage (those with a manifest), oldest first."""
        folder = self.root / stage
        if self.remote:  # one listing, not a request per version
            found = folder.fs.glob(f"{folder.path}/*/{MANIFEST}", detail=True)
            done = {k.rsplit("/", 2)[-2]: _mtime(info) for k, info in found.items()}
            return [v for v in sorted(done, key=done.get) if not v.startswith(".")]
        if not folder.is_dir():
            return []
        # a temporary folder has its manifest for a moment before it is renamed
        done = [p for p in folder.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()]
        return [p.name for p in sorted(done, key=lambda p: (p / MANIFEST).stat().st_mtime)]

    def lease(self, stage: str, version: str, log: Callable[[str], None] = print,
              run: str | None = None) -> Lease:
        """`with store.lease(stage, version) as lease:` waits for whoever builds that version."""
        return Lease(self, stage, version, log, run)

    def begin(self, lease: Lease) -> Build:
        """Where to build the leased version (see Build)."""
        if not self.remote:
            tmp = self.root / lease.stage / f"{TMP_PREFIX}{lease.version}-{lease.token}"
            tmp.mkdir(parents=True)
            return Build(lease, tmp, tmp)
        out = self.path(lease.stage, lease.version)
        # the lease holder owns the prefix: first what a dead builder left there goes, and on
        # a forced rebuild the old version (its manifest first, so nobody reads a mix)
        (out / MANIFEST).unlink(missing_ok=True)
        if out.exists():
            out.fs.rm(out.path, recursive=True)
        local = self.cache / "builds" / f"{lease.stage}-{lease.version}-{lease.token}"
        local.mkdir(parents=True)
        return Build(lease, out, local)

    def work_dir(self, stage: str, version: str) -> Path:
        """Scratch for one version that outlives a failed build (never read as an artifact);
        only the version's lease holder uses it. Always local: on a remote store a killed
        build resumes on the same machine."""
        if self.remote:
            return self.cache / "work" / stage / version
        return self.root / stage / f"{TMP_PREFIX}work-{version}"

    def commit(self, build: Build, manifest: dict) -> Path:
        """Checksum the files, write the manifest last, move LATEST. A local store renames
        the temporary folder into place; a remote one uploads the local files into the
        version's prefix, then writes the manifest there: the version appears whole."""
        lease, stage, version = build.lease, build.lease.stage, build.lease.version
        files = {str(p.relative_to(build.local)): p for p in sorted(build.local.rglob("*")) if p.is_file()}
        if self.remote:
            for rel, p in files.items():
                build.out.fs.put_file(str(p), f"{build.out.path}/{rel}")
            # the partitions the workers wrote are hashed where they are
            for rel in _remote_files(build.out) - set(files) - {MANIFEST}:
                files[rel] = build.out / rel
        manifest = dict(manifest, stage=stage, version=version, files={
            rel: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for rel, p in sorted(files.items())})
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        lease.confirm()
        final = self.path(stage, version)
        if self.remote:
            (final / MANIFEST).write_text(text)  # the commit
            shutil.rmtree(build.local, ignore_errors=True)
        else:
            (build.out / MANIFEST).write_text(text)
            if final.exists():  # a forced re-run of the same version: swap the old one out
                old = build.out.with_name(f"{build.out.name}-old")
                os.rename(final, old)
                os.rename(build.out, final)
                shutil.rmtree(old)
            else:
                os.rename(build.out, final)
        self.set_latest(stage, version)
        return final

    def abort(self, build: Build) -> None:
        """Remove a failed build's files (on a remote store only while the lease is still
        this build's: a run that took it over writes under the same prefix)."""
        shutil.rmtree(build.local, ignore_errors=True)  # on a local store, out too
        if self.remote and build.lease.problem() is None and build.out.exists():
            build.out.fs.rm(build.out.path, recursive=True)

    def local(self, stage: str, version: str, files: list[str] | None = None) -> Path:
        """A local folder holding the version's `files` (default: all), for readers that
        need local files. On a local store the version itself; on a remote one a cached
        copy, each file downloaded once and checked against the manifest's sha256."""
        if not self.remote:
            return self.path(stage, version)
        text = (self.path(stage, version) / MANIFEST).read_text()
        listed = json.loads(text)["files"]
        copy = self.cache / stage / version
        try:
            stale = (copy / MANIFEST).read_text() != text  # a forced rebuild replaced it
        except FileNotFoundError:
            stale = copy.exists()
        if stale:
            shutil.rmtree(copy, ignore_errors=True)
        wanted = listed if files is None else {k: listed[k] for k in files}
        copy.mkdir(parents=True, exist_ok=True)
        for rel, meta in wanted.items():
            dest = copy / rel
            if dest.is_file() and dest.stat().st_size == meta["bytes"]:
                continue  # checked when it was downloaded
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
            try:
                self.root.fs.get_file(f"{self.path(stage, version).path}/{rel}", str(part))
                if file_sha256(part) != meta["sha256"]:
                    raise ValueError(f"{self.path(stage, version) / rel}: sha256 differs from its "
                                     f"manifest; the store is damaged (`c2m verify --root {self.root}`)")
                os.replace(part, dest)
            finally:
                part.unlink(missing_ok=True)
        (copy / MANIFEST).write_text(text)
        return copy

    def set_latest(self, stage: str, version: str) -> None:
        pointer = self.root / stage / LATEST
        if self.remote:  # one PUT replaces an object whole
            pointer.write_text(version + "\n")
            return
        tmp = pointer.with_name(f"{LATEST}.{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_text(version + "\n")
            os.replace(tmp, pointer)
        finally:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half pointer behind

    def use_latest(self, stage: str, version: str) -> str | None:
        """Point LATEST at a version if it does not already; a cache hit on a read-only or
        full store still works, so a failure is returned as a warning, not raised."""
        pointer = self.root / stage / LATEST
        try:
            if pointer.read_text().strip() == version:
                return None
        except OSError:
            pass
        try:
            self.set_latest(stage, version)
        except OSError as exc:
            return f"{stage}: could not point {pointer} at {version} ({exc.strerror or exc}); using it anyway"
        return None

    def record_run(self, versions: dict[str, str], flow_run_name: str, flow_run_id) -> Path:
        """Write `runs/<flow run name>.json`: the version of each stage a run used, so
        that `c2m why --run` can follow a document through exactly those."""
        folder = self.root / RUNS
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{flow_run_name}.json"
        record = {"name": flow_run_name, "flow_run_id": str(flow_run_id),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions}
        if self.remote:  # one PUT: the object appears whole
            path.write_text(json.dumps(record, indent=2))
            return path
        tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def run_record(self, name_or_id: str) -> dict:
        """A recorded run by flow run name, or by flow run id or a unique prefix of it."""
        folder = self.root / RUNS
        path = folder / f"{name_or_id}.json"
        if name_or_id and path.is_file():
            return json.loads(path.read_text())
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
        found = [r for r in records if name_or_id and r.get("flow_run_id", "").startswith(name_or_id)]
        if len(found) == 1:
            return found[0]
        newest = sorted(records, key=lambda r: r.get("time", ""))[-5:]
        known = ", ".join(r["name"] for r in newest) or "none yet"
        raise FileNotFoundError(f"no run {name_or_id!r} recorded under {folder} "
                                f"({len(found) or 'no'} matches; runs there: {known})")

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

    # -- temporary folders and leases ----------------------------------------------

    def temporaries(self, stage: str | None = None) -> list[Temporary]:
        """Temporary folders and lease files, each with its owner and whether it is alive."""
        found = []
        for s in [stage] if stage else self.stages():
            folder = self.root / s
            if not folder.is_dir():
                continue
            # list first, read leases after: a build creates its lease before its folder,
            # so every folder listed here has its lease visible below while it is alive
            names = sorted(p.name for p in folder.iterdir())
            leases: dict[str, tuple[Path, dict | None, str | None]] = {}  # token -> lease
            live_versions: dict[str, dict | None] = {}  # version -> its live holder
            dead_versions: dict[str, dict | None] = {}
            for name in names:
                if not name.startswith(LEASE_PREFIX):
                    continue
                seen = _read_lease(folder / name)
                if seen is None:
                    continue
                info, age = seen
                dead = lease_dead(info, age)
                version = name[len(LEASE_PREFIX):].rsplit(".", 1)[0]
                leases[(info or {}).get("token") or name] = (folder / name, info, dead)
                (live_versions if dead is None else dead_versions)[version] = info
                found.append(Temporary(s, folder / name, "lease", version, info, dead is None,
                                       dead or "building now", folder_bytes(folder / name)))
            if self.remote:  # no temporary folders: a version's prefix without its manifest
                complete = set(self.versions(s))
                for name in names:
                    if name.startswith(".") or name == LATEST or name in complete:
                        continue
                    alive = name in live_versions
                    owner = live_versions.get(name) if alive else dead_versions.get(name)
                    found.append(Temporary(s, folder / name, "build", name, owner, alive,
                                           "building now" if alive else "no manifest and no live builder",
                                           folder_bytes(folder / name)))
                continue
            for name in names:
                if not name.startswith(TMP_PREFIX):
                    continue
                path, rest = folder / name, name[len(TMP_PREFIX):]
                if rest.startswith("work-"):
                    version = rest[len("work-"):]
                    alive = version in live_versions
                    owner = live_versions.get(version) if alive else dead_versions.get(version)
                    why = "in use" if alive else "its run is gone (a rerun of the same config resumes from it)"
                    found.append(Temporary(s, path, "work", version, owner, alive, why, folder_bytes(path)))
                    continue
                version, _, token = rest.partition("-")
                token = token.removesuffix("-old")
                lease_path, owner, dead = leases.get(token, (None, None, "its lease is gone"))
                alive = lease_path is not None and dead is None
                found.append(Temporary(s, path, "build", version, owner, alive,
                                       "building now" if alive else dead or "its lease is gone",
                                       folder_bytes(path)))
        return found

    def gc(self, stage: str | None = None, keep_work: bool = False,
           log: Callable[[str], None] = print, holding: Lease | None = None) -> tuple[int, int]:
        """Remove temporary folders and leases whose owner is gone, saying what and how
        much; a live owner's are never touched. keep_work spares resumable work folders.
        Returns (entries removed, bytes freed).

        Each version's leftovers are removed under its lease (taken without waiting, or the
        one the caller is `holding`), so no run can start building that version meanwhile."""
        orphans: dict[tuple[str, str], list[Temporary]] = {}
        for t in self.temporaries(stage):
            if not t.alive and not (keep_work and t.kind == "work"):
                orphans.setdefault((t.stage, t.version), []).append(t)
        count = freed = 0
        for (s, version), items in orphans.items():
            mine = holding is not None and (holding.stage, holding.version) == (s, version)
            lease = None if mine else Lease(self, s, version, log=lambda _: None, run="c2m gc")
            if lease is not None and lease.acquire(wait=False) is None:
                continue  # a run started building this version since we looked
            try:
                for t in items:
                    log(f"removing {t.describe()}")
                    if t.kind == "lease":
                        t.path.unlink(missing_ok=True)  # taking the lease removed it already
                    elif self.remote:
                        t.path.fs.rm(t.path.path, recursive=True)
                    else:
                        shutil.rmtree(t.path, ignore_errors=True)
                    count, freed = count + 1, freed + t.bytes
            finally:
                if lease is not None:
                    lease.release()
        return count, freed

    # -- verification ---------------------------------------------------------------

    def verify(self, stage: str, version: str) -> list[str]:
        """Problems with one version, one line each: files against the manifest's sizes
        and sha256 (none missing, none extra), and for document stages
        docs in = kept + rejected, counted from the Parquet files."""
        where = f"{stage}/{version}"
        folder = self.path(stage, version)
        try:
            manifest = self.manifest(stage, version)
        except (OSError, ValueError) as exc:
            return [f"{where}: manifest.json unreadable ({exc})"]
        problems = []
        listed = manifest.get("files", {})
        if self.remote:
            on_disk = _remote_files(folder) - {MANIFEST}
        else:
            on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {MANIFEST}
        for name in sorted(set(listed) - on_disk):
            problems.append(f"{where}: {name}: missing (listed in the manifest)")
        for name in sorted(on_disk - set(listed)):
            problems.append(f"{where}: {name}: not in the manifest")
        for name in sorted(set(listed) & on_disk):
            meta, path = listed[name], folder / name
            if path.stat().st_size != meta["bytes"]:
                problems.append(f"{where}: {name}: {path.stat().st_size} bytes, the manifest says {meta['bytes']}")
            elif file_sha256(path) != meta["sha256"]:
                problems.append(f"{where}: {name}: sha256 differs from the manifest")
        return problems + self._conservation(where, folder, manifest)

    def _conservation(self, where: str, folder: Path, manifest: dict) -> list[str]:
        stats = manifest.get("stats") or {}
        if "docs_in" not in stats and not ("docs" in stats and (folder / "docs").is_dir()):
            return []  # not a document stage
        problems: list[str] = []
        kept = _rows(folder / "docs", where, problems)
        if "docs_in" not in stats:  # the source stage: documents read = rows written
            if kept is not None and kept != stats["docs"]:
                problems.append(f"{where}: docs/ holds {kept} documents, the manifest says {stats['docs']}")
            return problems
        rejected = _rows(folder / "rejected", where, problems)
        if kept is None or rejected is None:
            return problems
        if kept != stats.get("docs_out"):
            problems.append(f"{where}: docs/ holds {kept} documents, the manifest says {stats.get('docs_out')} kept")
        if rejected != stats.get("docs_rejected"):
            problems.append(f"{where}: rejected/ holds {rejected} documents, the manifest says "
                            f"{stats.get('docs_rejected')} rejected")
        if kept + rejected != stats["docs_in"]:
            problems.append(f"{where}: {stats['docs_in']} documents in, but {kept} kept + "
                            f"{rejected} rejected = {kept + rejected}")
        for inp in manifest.get("inputs", {}).values():
            try:
                upstream = self.manifest(inp["stage"], inp["version"]).get("stats") or {}
            except (OSError, ValueError):
                problems.append(f"{where}: its input {inp['stage']}/{inp['version']} is missing")
                continue
            given = upstream.get("docs_out", upstream.get("docs"))
            if given is not None and given != stats["docs_in"]:
                problems.append(f"{where}: {stats['docs_in']} documents in, but its input "
                                f"{inp['stage']}/{inp['version']} kept {given}")
        return problems


def _remote_files(folder: Path) -> set[str]:
    """The files under a remote version's prefix, relative to it (one listing)."""
    prefix = folder.path.rstrip("/") + "/"
    return {key[len(prefix):] for key in folder.fs.find(folder.path)}


def _rows(folder: Path, where: str, problems: list[str]) -> int | None:
    """Rows in the Parquet files of a folder (none there = 0); None if one is unreadable."""
    total = 0
    for path in sorted(folder.glob("*.parquet")):
        try:
            total += open_partition(path).metadata.num_rows
        except ValueError as exc:
            problems.append(f"{where}: {path.parent.name}/{path.name}: {exc}")
            return None
    return total
