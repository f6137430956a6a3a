"""The serve process: the deployments of flows/deployments.py (one per config named on its
command line, and corpus-to-model/compare), served from this one process.

Started in the background by `c2m up` with every config in configs/; a later `c2m up`
compares that command line with configs/ and restarts it when configs were added or
removed. Users trigger runs with
`prefect deployment run corpus-to-model/<name> [-p overrides='{"train.max_steps": 100}'] --watch`.
"""
import sys

from flows.server import configure

configure()

from prefect import serve  # noqa: E402

from flows.deployments import for_serve  # noqa: E402

if __name__ == "__main__":
    serve(*for_serve(sys.argv[1:]), print_starting_message=True)
