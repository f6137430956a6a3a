"""Dask for the data stages: one client per flow run, shut down before training.

A LocalCluster by default; `dask.scheduler` in the config connects to an existing
cluster instead (its workers must have this project installed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

_client = None


def client(dask_cfg: dict):
    global _client
    if _client is None:
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        from dask.distributed import Client, LocalCluster

        if dask_cfg["scheduler"]:
            _client = Client(dask_cfg["scheduler"])
        else:
            scratch = Path(dask_cfg["local_directory"]).resolve()
            scratch.mkdir(parents=True, exist_ok=True)
            cluster = LocalCluster(n_workers=dask_cfg["workers"],
                                   threads_per_worker=dask_cfg["threads_per_worker"],
                                   memory_limit=dask_cfg["memory_limit"],
                                   local_directory=str(scratch),
                                   dashboard_address=None)
            _client = Client(cluster)
    return _client


def map_partitions(dask_cfg: dict, fn: Callable, items: Iterable, **kwargs: Any) -> list:
    """fn(item, **kwargs) for every item on the cluster, results in item order."""
    c = client(dask_cfg)
    futures = c.map(fn, list(items), **kwargs, pure=False)
    return c.gather(futures)


def shutdown() -> None:
    global _client
    if _client is not None:
        cluster = _client.cluster
        _client.close()
        if cluster is not None:
            cluster.close()
        _client = None
