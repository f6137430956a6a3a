"""The serve process: one deployment per config in configs/ (demo.toml -> corpus-to-model/demo).

Started in the background by `c2m up`; users trigger runs with
`prefect deployment run corpus-to-model/<name> [-p overrides='{"train.max_steps": 100}'] --watch`.
"""
from flows.server import configure

configure()

from prefect import serve  # noqa: E402

from flows.config import DEFAULTS, PROJECT_ROOT  # noqa: E402
from flows.flow import corpus_to_model  # noqa: E402


def deployments():
    for path in sorted((PROJECT_ROOT / "configs").glob("*.toml")):
        if path != DEFAULTS:
            yield corpus_to_model.to_deployment(
                name=path.stem, parameters={"config": str(path.relative_to(PROJECT_ROOT))},
                description=f"corpus-to-model with {path.name}")


if __name__ == "__main__":
    serve(*deployments(), print_starting_message=True)
