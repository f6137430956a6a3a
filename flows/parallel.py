"""Dask for the data stages: one client per flow run, shut down before training.

A LocalCluster by default; `dask.scheduler` in the config connects to an existing
cluster instead (its workers must have this project installed).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass

_client = None


@dataclass(config=ConfigDict(strict=True, extra="forbid", validate_assignment=True))
class DaskConfig:
    """The Dask cluster the data stages run on."""
    scheduler: str = Field("", description='address of an existing cluster ("tcp://host:8786"); '
                                           "empty = a LocalCluster")
    workers: int = Field(2, ge=1, le=1024, description="LocalCluster worker processes")
    threads_per_worker: int = Field(1, ge=1, le=256)
    memory_limit: str = Field("4GiB", description='per worker, e.g. "4GiB" or "800MB"')
    local_directory: str = Field(".c2m/dask", description="worker scratch space")

    UNVERSIONED: ClassVar[tuple[str, ...]] = (
        "scheduler", "workers", "threads_per_worker", "memory_limit", "local_directory")

    @field_validator("memory_limit")
    @classmethod
    def _bytes(cls, value: str) -> str:
        from dask.utils import parse_bytes

        try:
            parse_bytes(value)
        except ValueError:
            raise ValueError(f'{value!r} is not a size like "4GiB"') from None
        return value


def client(dask_cfg: DaskConfig):
    global _client
    if _client is None:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        from dask.distributed import Client, LocalCluster

        if dask_cfg.scheduler:
            _client = Client(dask_cfg.scheduler)
        else:
            scratch = Path(dask_cfg.local_directory).resolve()
            scratch.mkdir(parents=True, exist_ok=True)
            cluster = LocalCluster(n_workers=dask_cfg.workers,
                                   threads_per_worker=dask_cfg.threads_per_worker,
                                   memory_limit=dask_cfg.memory_limit,
                                   local_directory=str(scratch),
                                   dashboard_address=":0")  # a free port: runs may overlap
            _client = Client(cluster)
        # the flow logs prints: it shows in the run's log (bokeh, a dependency, serves it);
        # an existing cluster may run without one
        if "dashboard" in _client.scheduler_info().get("services", {}):
            print(f"Dask dashboard: {_client.dashboard_link}")
    return _client


def _unless_cancelled(fn: Callable, event: str, item: Any, **kwargs: Any) -> Any:
    from dask.distributed import Event

    if Event(event).is_set():
        return None  # another partition failed: its error is what the stage raises
    return fn(item, **kwargs)


def map_partitions(dask_cfg: DaskConfig, fn: Callable, items: Iterable,
                   on_progress: Callable[[dict], None] | None = None, **kwargs: Any) -> list:
    """fn(item, **kwargs) for every item on the cluster, results in item order.

    on_progress gets {"unit": "partition", "done", "total"} each time one finishes.

    When one fails, the rest are cancelled, and the first error is raised only once none
    of them runs any more: the caller can then remove the stage's temporary folder
    without a straggler writing into it again. A running task cannot be interrupted, so
    the partitions already running finish; those not started yet skip their work."""
    from dask.distributed import Event, as_completed, wait
    from dask.utils import funcname

    c = client(dask_cfg)
    run = uuid.uuid4().hex
    event, items = f"c2m-cancel-{run}", list(items)
    keys = [f"{funcname(fn)}-{run}-{i}" for i in range(len(items))]  # named after fn, not the guard
    futures = c.map(partial(_unless_cancelled, fn, event), items, key=keys, **kwargs)
    try:
        for done, future in enumerate(as_completed(futures), 1):
            if future.status == "error":
                future.result()  # raises the partition's error
            if on_progress:
                on_progress({"unit": "partition", "done": done, "total": len(futures)})
        return c.gather(futures)
    except BaseException:
        # a lost scheduler runs nothing more; its error must not hide the stage's own
        with contextlib.suppress(Exception):
            Event(event, client=c).set()
            wait(futures)
        raise
    finally:
        with contextlib.suppress(Exception):
            Event(event, client=c).clear()  # the scheduler forgets a cleared event


def shutdown() -> None:
    global _client
    if _client is not None:
        cluster = _client.cluster
        _client.close()
        if cluster is not None:
            cluster.close()
        _client = None
