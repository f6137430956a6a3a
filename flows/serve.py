"""The serve process: one deployment per config named on its command line (demo ->
configs/demo.toml -> corpus-to-model/demo), and corpus-to-model/compare (data variants
side by side; by default the shipped quality-rules comparison).

Started in the background by `c2m up` with every config in configs/; a later `c2m up`
compares that command line with configs/ and restarts it when configs were added or
removed. Users trigger runs with
`prefect deployment run corpus-to-model/<name> [-p overrides='{"train.max_steps": 100}'] --watch`.
"""
import sys

from flows.server import configure

configure()

from prefect import serve  # noqa: E402

from flows.compare import compare  # noqa: E402
from flows.config import PROJECT_ROOT  # noqa: E402
from flows.flow import corpus_to_model  # noqa: E402

COMPARE_DEFAULT = ["configs/compare/quality-on.toml", "configs/compare/quality-off.toml"]


def deployments(names: list[str]):
    for name in names:
        path = PROJECT_ROOT / "configs" / f"{name}.toml"
        yield corpus_to_model.to_deployment(
            name=name, parameters={"config": str(path.relative_to(PROJECT_ROOT))},
            description=f"corpus-to-model with {path.name}")


if __name__ == "__main__":
    serve(*deployments(sys.argv[1:]),
          compare.to_deployment(name="compare", parameters={"configs": COMPARE_DEFAULT, "seeds": 2},
                                description="data variants side by side: -p configs='[\"a.toml\", \"b.toml\"]'"),
          print_starting_message=True)
