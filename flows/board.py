"""`c2m tensorboard`: train runs side by side in TensorBoard, named by version.

An artifact keeps its event files in tensorboard/<run>/ (trainer.board): a train version
shows as the run <version>/train (train/*, val/* curves), the evaluate versions built
from it as <version>/evaluate (held-out curve, samples). With no version given: the
latest, and the trainings now running in this store (their work folders: live curves).
No torch import here: the event files are found by name, as TensorBoard finds them.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Callable

from flows.store import ArtifactStore

EVENTS_PREFIX = "events.out.tfevents."  # the tensorboard package's event file names


def event_folder(store: ArtifactStore, stage: str, version: str) -> Path | None:
    """The local folder (downloaded from a remote store) above the version's run folders of
    event files, or None if it has none."""
    files = [rel for rel in store.manifest(stage, version)["files"]
             if PurePosixPath(rel).name.startswith(EVENTS_PREFIX)]
    if not files:
        return None
    return store.local(stage, version, files) / PurePosixPath(files[0]).parts[0]


def runs(store: ArtifactStore, refs: list[str]) -> dict[Path, str]:
    """Folder of run folders -> the name its runs go under (TensorBoard's logdir_spec), for
    train versions or prefixes (none: the latest one and the live ones)."""
    found: dict[Path, str] = {}
    versions = [store.resolve("train", ref) for ref in refs]
    if not refs:
        found.update(live_runs(store))
        if store.latest("train") or not found:  # no artifact and nothing running: resolve's error
            versions = [store.resolve("train")]
    for version in dict.fromkeys(versions):
        folder = event_folder(store, "train", version)
        if folder is None:
            raise ValueError(f"train/{version} has no TensorBoard event files: it was trained before "
                             "c2m wrote them; train it again with this version of c2m to get its curves")
        found[folder] = version
        evaluated = [(e, event_folder(store, "evaluate", e)) for e in evaluations(store, version)]
        evaluated = [(e, folder) for e, folder in evaluated if folder is not None]
        for evaluation, folder in evaluated:  # several: <version>/<evaluate version>/evaluate
            found[folder] = version if len(evaluated) == 1 else f"{version}/{evaluation}"
    return found


def evaluations(store: ArtifactStore, train_version: str) -> list[str]:
    """The evaluate versions built from a train version, oldest first."""
    return [v for v in store.versions("evaluate")
            if store.manifest("evaluate", v)["inputs"].get("train", {}).get("version") == train_version]


def live_runs(store: ArtifactStore) -> dict[Path, str]:
    """Trainings running now whose work folder (on this machine) has event files."""
    found = {}
    for t in store.temporaries("train"):
        if t.kind == "lease" and t.alive:
            events = next(store.work_dir("train", t.version).glob(f"*/*/{EVENTS_PREFIX}*"), None)
            if events is not None:
                found[events.parent.parent] = t.version
    return found


def logdir_spec(found: dict[Path, str]) -> str:
    """TensorBoard's --logdir_spec: name:path,name:path (no comma in either)."""
    for folder in found:
        if "," in str(folder):
            raise ValueError(f"TensorBoard cannot take {folder} (a comma in the path); "
                             "move the artifact root to a path without one")
    return ",".join(f"{name}:{folder}" for folder, name in found.items())


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def serve(found: dict[Path, str], port: int, host: str = "127.0.0.1",
          log: Callable[[str], None] = print) -> int:
    """Run TensorBoard over the runs until it exits or this process is stopped (Ctrl-C,
    SIGTERM: it is stopped too); its exit code."""
    if not port_free(host, port):
        raise OSError(f"port {port} on {host} is in use (another TensorBoard?): pass --port")
    # --load_fast=false: only TensorBoard's Python reader takes logdir_spec; asked for, it
    # starts without a note about falling back (both readers apply purge_step, measured)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir_spec", logdir_spec(found),
               "--host", host, "--port", str(port), "--load_fast", "false"]
    for folder, name in found.items():
        log(f"{name}: {folder}")
    log(f"TensorBoard at http://{host}:{port}/ (Ctrl-C stops it)")
    process = subprocess.Popen(command)
    try:
        return process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
