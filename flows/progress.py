"""Live progress: a Prefect progress artifact per stage run, and the line in the terminal.

A stage reports progress as a dict: {"unit", "done", "total"} plus, from training,
"loss", "tokens_per_s", "elapsed_s", "eta_s" (see trainer.train.train's on_progress).
`StageProgress` turns those into one progress artifact per stage run (key
`<stage>-progress`), created on the first report, updated at most once a second, and at
100 when done == total; in-process listeners (`c2m run`) get every report.
`TerminalLine` draws it: a rich progress display on a terminal, else one plain line per
10%. `watch_flow_run` follows a run on the server (`c2m demo`) through the Prefect client.

No Prefect import at module level: `c2m --help` imports this.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from flows.report import duration

MIN_INTERVAL_S = 1.0  # between artifact updates: each one costs the server a write

# in-process watchers, called with (stage, percent, text) on every report
LISTENERS: list[Callable[[str, float, str], None]] = []


def percent(info: dict) -> float:
    return 100.0 * info["done"] / info["total"] if info["total"] else 100.0


def describe(stage: str, info: dict) -> str:
    """One line: `train: step 120/2000 · loss 4.210 · 3,812 tok/s · ETA 6 min 12 s`."""
    parts = [f"{stage}: {info.get('unit', 'item')} {info['done']:,}/{info['total']:,}"]
    if info.get("loss") is not None:
        parts.append(f"loss {info['loss']:.3f}")
    if info.get("tokens_per_s"):
        parts.append(f"{info['tokens_per_s']:,.0f} tok/s")
    if info.get("eta_s") is not None:
        parts.append(f"ETA {duration(info['eta_s'])}")
    return " · ".join(parts)


class StageProgress:
    """The progress of one stage run: call it with each report."""

    def __init__(self, stage: str, min_interval: float = MIN_INTERVAL_S):
        self.stage, self.min_interval = stage, min_interval
        self.artifact_id = None
        self.last_sent = float("-inf")
        self.broken = False  # an update failed: said once, not tried again

    def __call__(self, info: dict) -> None:
        pct, text = percent(info), describe(self.stage, info)
        for listener in list(LISTENERS):
            try:
                listener(self.stage, pct, text)
            except Exception as exc:  # noqa: BLE001  a broken display must not fail the stage
                LISTENERS.remove(listener)
                self._warn(f"progress display stopped: {type(exc).__name__}: {one_line(str(exc))}")
        now = time.monotonic()
        if self.broken or (now - self.last_sent < self.min_interval and pct < 100):
            return  # the final report always goes out
        self.last_sent = now
        try:
            self._publish(pct, text)
        except Exception as exc:  # noqa: BLE001  a lost update must not fail a long stage
            self.broken = True
            self._warn(f"its progress artifact is no longer updated: {type(exc).__name__}: "
                       f"{one_line(str(exc))}")

    def _warn(self, message: str) -> None:
        import logging

        from prefect.context import TaskRunContext

        if TaskRunContext.get() is not None:
            from prefect import get_run_logger

            get_run_logger().warning(f"{self.stage}: {message}")
        else:
            logging.getLogger(__name__).warning(f"{self.stage}: {message}")

    def _publish(self, pct: float, text: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext

        if TaskRunContext.get() is None:
            return  # called outside a Prefect task (a test, a library caller): nothing to attach it to
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=pct, key=f"{self.stage}-progress",
                                                        description=text)
        else:
            update_progress_artifact(self.artifact_id, progress=pct, description=text)


class TerminalLine:
    """Stage progress on the terminal: a rich display (one bar per stage, Prefect's log
    lines scrolling above it) when `stream` is a terminal; else a plain line each time a
    stage passes another 10%, so a log file stays short."""

    def __init__(self, stream: TextIO | None = None, console=None):
        self.stream = stream or sys.stderr
        self.console = console  # a rich Console already writing to stream (Prefect's), if any
        self.rich = None
        self.tasks: dict[str, int] = {}
        self.tenths: dict[str, int] = {}

    def __enter__(self) -> TerminalLine:
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn

            console = self.console or Console(file=self.stream)
            # explicit styles: Prefect's console has a theme without rich's defaults
            bar = BarColumn(bar_width=20, style="grey37", complete_style="cyan",
                            finished_style="green", pulse_style="cyan")
            self.rich = Progress(bar, TextColumn("{task.description}", style="none"),
                                 console=console, transient=False)
            self.rich.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.rich is not None:
            self.rich.stop()

    def show(self, stage: str, pct: float, text: str) -> None:
        if self.rich is not None:
            if stage not in self.tasks:
                self.tasks[stage] = self.rich.add_task(text, total=100)
            self.rich.update(self.tasks[stage], completed=pct, description=text)
            return
        tenth = int(pct // 10)
        if tenth > self.tenths.get(stage, -1):
            self.tenths[stage] = tenth
            # not print(): inside a flow run that logs prints, it would become a log line
            self.stream.write(text + "\n")
            self.stream.flush()


def prefect_console():
    """The rich Console of Prefect's console log handler, so that its log lines print
    above a live display instead of through it; None without one."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler):
                return handler.console
    return None


# -- a run on the server -----------------------------------------------------------

POLL_S = 1.0


def watch_flow_run(client, flow_run_id, line: TerminalLine, poll_s: float = POLL_S):
    """Follow a flow run until it ends, showing each stage as it runs (its progress
    artifact when it has one). Returns the final flow run."""
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType, FlowRunFilter, FlowRunFilterId)
    from prefect.client.schemas.sorting import ArtifactSort

    artifacts = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                               type=ArtifactFilterType(any_=["progress"]))
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    shown: dict[str, tuple[float, str]] = {}

    def show(stage: str, pct: float, text: str) -> None:
        if shown.get(stage) != (pct, text):
            shown[stage] = (pct, text)
            line.show(stage, pct, text)

    while True:
        run = client.read_flow_run(flow_run_id)
        progress = {a.key.removesuffix("-progress"): a for a in
                    client.read_artifacts(artifact_filter=artifacts, sort=ArtifactSort.CREATED_DESC)
                    if a.key}
        for task_run in sorted(client.read_task_runs(flow_run_filter=runs),
                               key=lambda t: t.expected_start_time or t.created):
            stage, state = stage_of(task_run), task_run.state
            if stage in progress and progress[stage].task_run_id == task_run.id:
                show(stage, float(progress[stage].data or 0), progress[stage].description or stage)
            elif state is not None and state.is_running():
                show(stage, 0.0, f"{stage}: running")
            elif state is not None and state.is_completed():
                show(stage, 100.0, f"{stage}: {state.name.lower()}")
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(poll_s)


def failed_stages(client, flow_run_id) -> list[tuple[str, str]]:
    """(stage, one-line error) for each failed or crashed task run of a flow run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    found = []
    for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))):
        state = task_run.state
        if state is not None and (state.is_failed() or state.is_crashed()):
            found.append((stage_of(task_run), one_line(state.message or state.name)))
    return found


def stage_of(task_run) -> str:
    return task_run.name.rsplit("-", 1)[0]  # task runs are named <stage>-<suffix>


def one_line(message: str) -> str:
    first = next((line.strip() for line in message.splitlines() if line.strip()), message)
    for prefix in ("Task run encountered an exception ", "Flow run encountered an exception: "):
        first = first.removeprefix(prefix)
    return first
