"""Train in several processes on this machine: torchrun, started as a subprocess.

`trainer.train.train` comes here when `processes` > 1 and it is not itself one of
torchrun's ranks. The caller (a Prefect task, a notebook) stays out of the process group:
it starts `python -m trainer.launch` (torchrun's own command line, see `agent_main`), whose
ranks run `python -m trainer.train --json-lines` on the same inputs and out_dir, so the
files written are those of an in-process run. The ranks write to the caller's pipe:
rank 0 its log lines, progress reports and result as JSON lines, every rank a JSON line
when it fails, and torch prefixes a rank's traceback with `[rankN]:`. The caller turns
them back into log calls, on_progress calls, the result, or one error naming the rank.
(torchrun's --tee would prefix every line, but its log-tailing threads can keep torchrun
from exiting after a SIGTERM.)

Stopping: an exception in the caller (Ctrl-C, a cancelled task) sends torchrun SIGTERM,
which stops its ranks, and SIGKILL after a grace period. A caller killed outright takes
them along too: torchrun, then each rank, gets SIGKILL when its parent dies (Linux
`prctl(PR_SET_DEATHSIG)`), so no rank keeps writing into out_dir behind a later run.
"""
from __future__ import annotations

import collections
import ctypes
import glob
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

LAST_LINES = 12  # of the failed rank, in the error
STOP_GRACE_S = 20  # torchrun's own shutdown of its ranks, before SIGKILL
PARENT_PID = "C2M_PARENT_PID"  # the process a launched process dies with
RANK_LINE = re.compile(r"\[rank(\d+)\]: ?(.*)")  # torch's prefix of a rank's traceback
ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


class RankFailed(RuntimeError):
    """A training process failed; the message names the rank and ends with its last lines."""


def cores() -> int:
    """The cores this process may use (container limits included)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have Linux send `sig` to this process when its parent exits; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_deathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_deathsig, int(sig), 0, 0, 0) != 0:
        return  # best effort: the launcher still stops torchrun itself
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os.kill(os.getpid(), sig)


def command(train_shards: list[Path], vocab_size: int, cfg, out_dir: Path, *,
            val_shards: list[Path] | None, val_tokens_per_byte: float | None,
            init_from: Path | None, resume: bool, stop_after: int | None) -> list[str]:
    """The torchrun command line that trains on these inputs in cfg.processes processes."""
    cmd = [sys.executable, "-m", "trainer.launch", "--standalone", f"--nproc-per-node={cfg.processes}",
           "-m", "trainer.train", "--json-lines",
           "--vocab-size", str(vocab_size), "--out", str(out_dir),
           "--shards", *(glob.escape(str(p)) for p in train_shards)]  # each a literal path
    if val_shards:
        cmd += ["--val-shards", *(glob.escape(str(p)) for p in val_shards)]
    if val_tokens_per_byte is not None:
        cmd += ["--val-tokens-per-byte", repr(val_tokens_per_byte)]
    if init_from is not None:
        cmd += ["--init-from", str(init_from)]
    if resume:
        cmd.append("--resume")
    if stop_after is not None:
        cmd += ["--stop-after", str(stop_after)]
    for key, value in asdict(cfg).items():  # JSON scalars are TOML values, which --set reads
        for field, v in value.items() if isinstance(value, dict) else [("", value)]:  # [train.lora]
            cmd += ["--set", f"{key}.{field}={json.dumps(v)}" if field else f"{key}={json.dumps(v)}"]
    return cmd


def launch(train_shards: list[Path], vocab_size: int, cfg, out_dir: Path,
           log: Callable[[str], None] = print, *, val_shards: list[Path] | None = None,
           val_tokens_per_byte: float | None = None, init_from: Path | None = None,
           resume: bool = False, stop_after: int | None = None,
           on_progress: Callable[[dict], None] | None = None) -> dict:
    """`train` in cfg.processes processes under torchrun: the same arguments, the same
    files in out_dir and the same result; raises RankFailed naming the failed rank."""
    if cfg.device != "cpu":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (cfg.device == "cuda" or gpus) and gpus < cfg.processes:
            raise ValueError(f"train.processes = {cfg.processes} needs a GPU per process on CUDA, "
                             f"and this machine has {gpus}: lower train.processes or set train.device = \"cpu\"")
    threads = cfg.threads or max(1, cores() // cfg.processes)  # as trainer.train._setup picks them
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", PARENT_PID: str(os.getpid())}
    cmd = command(train_shards, vocab_size, cfg, out_dir, val_shards=val_shards,
                  val_tokens_per_byte=val_tokens_per_byte, init_from=init_from, resume=resume,
                  stop_after=stop_after)
    log(f"starting {cfg.processes} training processes with torchrun, {threads} thread(s) each")
    # its own session: a Ctrl-C meant for the caller reaches torchrun only through the
    # caller, which stops it below
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=env, start_new_session=True)
    follower = Follower(log, on_progress)
    try:
        for line in proc.stdout:
            follower.line(line.rstrip("\n"))
        code = proc.wait()
    except BaseException:
        stop(proc)
        raise
    if code != 0:
        raise RankFailed(follower.failure(code, cfg.processes))
    if follower.result is None:
        raise RankFailed("torchrun exited 0, but rank 0 printed no result; its last lines:\n"
                         + follower.last(0))
    return follower.result


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to torchrun (it stops its ranks), SIGKILL if it is still there after the grace."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue


class Follower:
    """Reads the merged output of torchrun and its ranks: rank 0's JSON lines become log
    and progress calls and the result; other lines are logged as they are (a rank's
    traceback with its rank); the last lines of each rank are kept for the error."""

    def __init__(self, log: Callable[[str], None], on_progress: Callable[[dict], None] | None):
        self.log, self.on_progress = log, on_progress
        self.result: dict | None = None
        self.failures: list[tuple[float, int, str]] = []  # (time, rank, error) as the ranks said
        self.lines: dict[int | None, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=LAST_LINES))  # None: torchrun's, or a rank's unmarked

    def line(self, line: str) -> None:
        event = _event(line)
        if event is None:
            match = RANK_LINE.match(line)
            rank, text = (int(match.group(1)), match.group(2)) if match else (None, line)
            self.lines[rank].append(text)
            if not self.failures:  # after a failure: torchrun's report of it, which the error sums up
                self.log(text if rank is None else f"rank {rank}: {text}")
        elif "log" in event:  # only rank 0 logs
            self.lines[0].append(event["log"])
            self.log(event["log"])
        elif "progress" in event:
            if self.on_progress:
                self.on_progress(event["progress"])
        elif "result" in event:
            self.result = event["result"]
        elif "failed" in event:
            failed = event["failed"]
            self.failures.append((failed["time"], failed["rank"], failed["error"]))

    def last(self, rank: int | None) -> str:
        return "\n".join(f"  {line}" for line in self.lines[rank]) or "  (none)"

    def failure(self, code: int, processes: int) -> str:
        """One message: the rank that failed first and why, then its last lines."""
        if self.failures:  # the earliest exception: the others are usually its consequence
            _, rank, error = min(self.failures)
        else:  # no rank got to say it (killed by a signal, or torchrun failed itself)
            cause = ROOT_CAUSE.search("\n".join(self.lines[None]))
            if not cause:
                return (f"training failed: torchrun exited with code {code}; its last lines:\n"
                        + self.last(None))
            rank, error = int(cause.group(1)), f"exit code {cause.group(2)}"
            if int(cause.group(2)) < 0:
                error += f" ({signal.Signals(-int(cause.group(2))).name})"
        return f"training failed in rank {rank} of {processes}: {error}\nits last lines:\n{self.last(rank)}"


def _event(text: str) -> dict | None:
    """A rank's JSON line (log, progress, result or failed), or None for any other line."""
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return event if isinstance(event, dict) and event.keys() & {"log", "progress", "result", "failed"} else None


def agent_main(argv: list[str]) -> None:
    """torchrun with its command line, dying with the process that started it."""
    if os.environ.get(PARENT_PID):
        die_with_parent(int(os.environ[PARENT_PID]))
    os.environ[PARENT_PID] = str(os.getpid())  # each rank dies with torchrun
    from torch.distributed.run import main

    main(argv)


if __name__ == "__main__":
    agent_main(sys.argv[1:])
