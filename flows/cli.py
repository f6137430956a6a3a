"""`c2m`: run the flow, manage the local server, inspect artifacts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import click
import typer

from flows import server
from flows.config import load_config
from flows.stages import select_stages
from flows.store import ArtifactStore

server.configure()  # before anything imports prefect

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="corpus-to-model: raw HTML in, a trained and evaluated GPT out.")

ROOT_OPTION = typer.Option("artifacts", "--root", help="artifact root")


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{what} {item!r} should look like KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _run_flow(config: str, overrides: list[str], stages: list[str] | None, from_stage: str | None,
              force: bool, pins: list[str]) -> dict:
    sets = _pairs(overrides, "--set")
    if "source.path" in sets:  # relative to where the user typed it
        sets["source.path"] = str(Path(sets["source.path"]).resolve())
    load_config(config, sets)  # a typo fails here, in one line, before any run starts
    select_stages(stages, from_stage)
    server.start(log=lambda m: typer.echo(m, err=True))
    from flows.flow import corpus_to_model

    result = corpus_to_model(config=config, overrides=sets, stages=stages, from_stage=from_stage,
                             force=force, pins=_pairs(pins, "--pin"))
    typer.echo(json.dumps(result, indent=2))
    return result


@app.command()
def run(config: str = typer.Option("configs/demo.toml", help="TOML config (over configs/defaults.toml)"),
        set_: list[str] = typer.Option([], "--set", help="override, e.g. --set train.max_steps=100"),
        stage: list[str] = typer.Option([], help="build only these stages (repeatable)"),
        from_stage: Optional[str] = typer.Option(None, "--from", help="build this stage and all after it"),
        force: bool = typer.Option(False, help="rebuild the chosen stages even on a cache hit"),
        pin: list[str] = typer.Option([], help="use STAGE=VERSION as is")):
    """Run the flow in this process (stages already built with this config are skipped)."""
    _run_flow(config, set_, stage or None, from_stage, force, pin)


@app.command("stage")
def stage_(name: str = typer.Argument(..., help="the stage to re-run"),
           config: str = typer.Option("configs/demo.toml"),
           set_: list[str] = typer.Option([], "--set"),
           force: bool = typer.Option(False, help="rebuild even on a cache hit"),
           pin: list[str] = typer.Option([])):
    """Re-run one stage; its inputs come from the store."""
    _run_flow(config, set_, [name], None, force, pin)


@app.command()
def up():
    """Start the local Prefect server and the process serving the deployments."""
    server.start()


@app.command()
def down():
    """Stop exactly the server and serve processes that `c2m up` started."""
    server.stop()


@app.command()
def status():
    """Whether the server and serve process run, and where their logs are."""
    typer.echo(json.dumps(server.status(), indent=2))


@app.command()
def demo(root: str = ROOT_OPTION):
    """Serve the deployments and run corpus-to-model/demo end to end through the server."""
    server.start()
    prefect = str(Path(sys.executable).with_name("prefect"))
    cmd = [prefect, "deployment", "run", "corpus-to-model/demo", "--watch"]
    typer.echo("$ " + " ".join(["prefect", *cmd[1:]]))
    code = subprocess.call(cmd, env={**os.environ, **server.prefect_env()})
    if code != 0:
        typer.echo(f"the demo run failed; the serve log is {server.STATE / 'serve.log'}:\n"
                   f"{server.tail('serve', 40)}", err=True)
        raise typer.Exit(code)
    store = ArtifactStore(root)
    evaluate = store.path("evaluate", store.resolve("evaluate"))
    model = store.path("train", store.resolve("train"))
    metrics = json.loads((evaluate / "metrics.json").read_text())
    typer.echo(f"\nvalidation loss {metrics['loss']:.3f} nats/token "
               f"(unigram entropy {metrics['unigram_entropy']:.3f}), perplexity {metrics['perplexity']:.1f}, "
               f"top-1 accuracy {metrics['accuracy']:.3f}")
    anchors = ", ".join(f"{name} {bpb:.3f}" for name, bpb in metrics["compressors"].items())
    typer.echo(f"bits per byte {metrics['bits_per_byte']:.3f} (unigram {metrics['unigram_bits_per_byte']:.3f}; "
               f"{anchors})")
    typer.echo(f"report: {evaluate / 'report.md'}")
    typer.echo(f"model:  {model / 'model.pt'}")
    typer.echo(f"server: http://{server.HOST}:{server.PORT} (stop it with `c2m down`)")


MODEL_ARGUMENT = typer.Argument("", help="train version or prefix (default LATEST), or a train artifact folder")


@app.command()
def generate(model: str = MODEL_ARGUMENT,
             prompt: list[str] = typer.Option([""], "--prompt", "-p", help="text to continue (repeatable)"),
             n: int = typer.Option(1, "-n", help="samples per prompt"),
             max_new_tokens: int = typer.Option(100, "--tokens", help="tokens to generate per sample"),
             temperature: float = typer.Option(0.8, help="0 = greedy"),
             top_k: int = typer.Option(0, "--top-k", help="keep the k likeliest tokens (0 = all)"),
             top_p: float = typer.Option(0.95, "--top-p", help="nucleus: keep the likeliest tokens "
                                                                 "up to this probability mass (1 = all)"),
             seed: int = typer.Option(1234),
             root: str = ROOT_OPTION):
    """Sample text from a trained model artifact."""
    from tokenizers import Tokenizer

    from flows.stages import model_artifact
    from trainer.generate import generate_texts
    from trainer.model import load_model

    found = model_artifact(model, root)
    net, _ = load_model(found["model"])
    samples = generate_texts(net, Tokenizer.from_file(str(found["tokenizer"])), prompt, n=n,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k or None, top_p=top_p if top_p < 1 else None, seed=seed)
    typer.echo(f"# train/{found['version']}", err=True)
    for sample in samples:
        typer.echo(sample["text"])
        typer.echo("-" * 40)


@app.command()
def export(model: str = MODEL_ARGUMENT,
           out: Path = typer.Option(..., "--out", help="folder to write the Hugging Face model into"),
           root: str = ROOT_OPTION):
    """Write a model artifact in Hugging Face format (GPT-2 config, safetensors, tokenizer)."""
    from flows.stages import model_artifact
    from trainer.export import export_hf

    found = model_artifact(model, root)
    path = export_hf(found["model"], found["tokenizer"], out)
    typer.echo(f"train/{found['version']} -> {path}\n"
               f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})")


@app.command("fetch-detoxify")
def fetch_detoxify(model: str = typer.Argument("original", help="original | unbiased | multilingual")):
    """Download detoxify's weights and config (needs internet) to where `auto` finds them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    code = subprocess.call([sys.executable, "-m", "corpus.toxicity", model], env=env)
    if code != 0:
        raise RuntimeError(
            f"fetching detoxify {model} failed (see above). It needs internet: run "
            "`c2m fetch-detoxify` on a machine that has it, then copy the checkpoint and the "
            "config folder it prints to the same paths here, or point filter.detoxify_checkpoint "
            "and filter.detoxify_config_dir at them.")


@app.command()
def ls(stage: Optional[str] = typer.Argument(None), root: str = ROOT_OPTION):
    """List stages, or the versions of one stage (newest last; * = LATEST)."""
    store = ArtifactStore(root)
    if stage is None:
        for s in store.stages():
            typer.echo(f"{s:10s} {len(store.versions(s))} versions, latest {store.latest(s)}")
        return
    latest = store.latest(stage)
    for v in store.versions(stage):
        m = store.manifest(stage, v)
        typer.echo(f"{'*' if v == latest else ' '} {v}  {m['finished'][:19]}  {m['duration_s']:8.1f} s  "
                   + " ".join(f"{i['stage']}/{i['version']}" for i in m["inputs"].values()))


@app.command()
def show(stage: str, version: Optional[str] = typer.Argument(None, help="version or prefix; default LATEST"),
         manifest: bool = typer.Option(False, "--manifest", help="print manifest.json instead of report.md"),
         root: str = ROOT_OPTION):
    """Print a stage artifact's report (or manifest)."""
    store = ArtifactStore(root)
    path = store.path(stage, store.resolve(stage, version))
    typer.echo((path / ("manifest.json" if manifest else "report.md")).read_text())


@app.command()
def lineage(stage: str, version: Optional[str] = typer.Argument(None), root: str = ROOT_OPTION):
    """The artifact and every artifact it was built from."""
    store = ArtifactStore(root)
    for s, v in store.lineage(stage, store.resolve(stage, version)):
        typer.echo(f"{s}/{v}  {store.path(s, v)}")


def main() -> None:
    """The console script: known failures print one clear line, not a traceback."""
    try:
        app(standalone_mode=False)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()
