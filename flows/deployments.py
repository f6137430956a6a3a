"""The deployments, one list for both ways of running them: one per config named (demo ->
configs/demo.toml -> corpus-to-model/demo), and corpus-to-model/compare (data variants side
by side; by default the shipped quality-rules comparison).

- `python -m flows.serve NAME...` serves them from one process (`c2m up`).
- `python -m flows.deployments --pool POOL NAME...` registers them into a process work pool
  (created if absent) and exits; `prefect worker start --pool POOL` then runs them
  (`c2m up --pool POOL` does both). Their code is this checkout: the entrypoints are module
  paths (flows.flow.corpus_to_model), imported from the installed project, and each run's
  pull step sets its working directory to the checkout, as under serve.

Users trigger runs with
`prefect deployment run corpus-to-model/<name> [-p overrides='{"train.max_steps": 100}'] --watch`.
"""
from __future__ import annotations

import argparse
import sys

from flows.server import COMPARE_DEPLOYMENT, configure

configure()

from prefect.runner.storage import LocalStorage  # noqa: E402
from prefect.types.entrypoint import EntrypointType  # noqa: E402

from flows.compare import compare  # noqa: E402
from flows.config import PROJECT_ROOT  # noqa: E402
from flows.flow import corpus_to_model  # noqa: E402

COMPARE_DEFAULT = ["configs/compare/quality-on.toml", "configs/compare/quality-off.toml"]


def specs(names: list[str]) -> list[tuple]:
    """(flow, deployment name, parameters, description) of every deployment."""
    configs = [(corpus_to_model, name, {"config": f"configs/{name}.toml"}, f"corpus-to-model with {name}.toml")
               for name in names]
    return [*configs, (compare, COMPARE_DEPLOYMENT, {"configs": COMPARE_DEFAULT, "seeds": 2},
                       "data variants side by side: -p configs='[\"a.toml\", \"b.toml\"]'")]


def for_serve(names: list[str]) -> list:
    deployments = [flow.to_deployment(name=name, parameters=parameters, description=description)
                   for flow, name, parameters, description in specs(names)]
    for deployment in deployments:
        # set, not just absent: a deployment registered into a work pool before (`c2m up
        # --pool`) leaves it, so that its runs go to the serve process (Prefect's own
        # Runner.add_flow does the same)
        deployment.work_pool_name = None
        deployment.work_queue_name = None
    return deployments


def for_pool(names: list[str], pool: str) -> list:
    deployments = [flow.to_deployment(name=name, parameters=parameters, description=description,
                                      work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH)
                   for flow, name, parameters, description in specs(names)]
    for deployment in deployments:
        # its pull step: `set_working_directory` to this checkout (no copy, no remote storage)
        deployment.storage = LocalStorage(str(PROJECT_ROOT))
    return deployments


def ensure_process_pool(client, pool: str) -> None:
    """Create the process work pool `pool` unless it exists; refuse one of another type
    (its workers would not run local code)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        kind = client.read_work_pool(pool).type
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(
            name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
        print(f"created process work pool {pool!r}")
        return
    if kind != "process":
        raise SystemExit(f"error: work pool {pool!r} is of type {kind!r}; these deployments need a "
                         f"process pool: choose another name, or `prefect work-pool delete {pool}`")


def register(pool: str, names: list[str]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        ensure_process_pool(client, pool)
    for deployment in for_pool(names, pool):
        deployment.apply()
        print(f"registered {deployment.flow_name}/{deployment.name} in work pool {pool!r}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments",
                                     description="register the deployments into a process work pool")
    parser.add_argument("--pool", required=True, help="work pool name (created as type process if absent)")
    parser.add_argument("configs", nargs="*", help="config names (configs/NAME.toml); default: all")
    args = parser.parse_args(argv)
    from flows.server import served_configs

    register(args.pool, args.configs or served_configs())


if __name__ == "__main__":
    main(sys.argv[1:])
