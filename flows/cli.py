"""`c2m`: run the flow, manage the local server, inspect artifacts."""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import typer

from flows import server
from flows.config import ConfigError, load_config
from flows.store import ArtifactStore, human_bytes

server.configure()  # before anything imports prefect

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]})

# typer >= 0.2x raises its own copies of click's exception classes: take them from typer
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _version(show: bool) -> None:
    if show:
        typer.echo(f"corpus-to-model {importlib.metadata.version('corpus-to-model')}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print the version and exit")):
    """corpus-to-model: raw HTML in, a trained and evaluated GPT out.

    Exit codes: 0 done; 1 failed (one `error:` line, the traceback in .c2m/logs/);
    2 bad command line or config (nothing ran); 130 interrupted (Ctrl-C), 143 on SIGTERM."""

ROOT_OPTION = typer.Option("artifacts", "--root", help="artifact root")


def _key_values(items: list[str]) -> list[str]:
    """Option callback: a usage error (exit 2) unless every item is KEY=VALUE."""
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r} should look like KEY=VALUE")
    return items


def _pairs(items: list[str]) -> dict[str, str]:
    return {key.strip(): value.strip() for key, _, value in (i.partition("=") for i in items)}


def _overrides(items: list[str]) -> dict[str, str]:
    sets = _pairs(items)
    for key in ("source.path", "holdout.path"):  # relative to where the user typed it
        if key in sets:
            sets[key] = str(Path(sets[key]).resolve())
    return sets


def _run_flow(config: str, overrides: list[str], stages: list[str] | None, from_stage: str | None,
              force: bool, pins: list[str]) -> dict:
    from flows.stages import select_stages  # brings torch: not needed by the other commands

    sets = _overrides(overrides)
    load_config(config, sets)  # a typo fails here, in one line, before any run starts
    select_stages(stages, from_stage)

    def call():
        from flows.flow import corpus_to_model

        return corpus_to_model(config=config, overrides=sets, stages=stages, from_stage=from_stage,
                               force=force, pins=_pairs(pins), return_state=True)
    result = _in_process(call)
    typer.echo(json.dumps(result, indent=2))
    return result


def _in_process(call):
    """Run a flow (`call` returns its final state) in this process against the project's
    server (or one of its own), with the stages' progress on one terminal line; its
    result, or its error with the failed stage named."""
    with server.for_run(log=lambda m: typer.echo(m, err=True)):
        import flows.flow  # noqa: F401  sets up Prefect's logging, which the next line adjusts
        from flows import progress

        _console_without_tracebacks()
        with progress.TerminalLine(console=progress.prefect_console()) as line:
            progress.LISTENERS.append(line.show)
            try:
                with _ctrl_c_kept():
                    state = call()
            finally:
                progress.LISTENERS.remove(line.show)
        if not state.is_completed():
            _name_failed_stage(state)
        return state.result()


@contextlib.contextmanager
def _ctrl_c_kept():
    """Ctrl-C raises KeyboardInterrupt as usual, and one the block swallowed is raised again
    on leaving it: Prefect's engine drops a Ctrl-C that lands once the run's state is final."""
    came: list[int] = []

    def handler(signum, frame):
        came.append(signum)
        signal.default_int_handler(signum, frame)
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came:
        raise KeyboardInterrupt


def _name_failed_stage(state) -> None:
    """Raise the failed flow run's error, noting which stage failed (from the server)."""
    from prefect.client.orchestration import get_client

    from flows.progress import failed_stages

    try:
        state.result()
    except Exception as exc:
        with contextlib.suppress(Exception):  # the error itself matters more than its stage
            with get_client(sync_client=True) as client:
                for stage, _ in failed_stages(client, state.state_details.flow_run_id):
                    exc.add_note(f"in stage {stage}")
        raise


class _WithoutTraceback(logging.Formatter):
    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info = record.exc_text = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def _console_without_tracebacks() -> None:
    """Prefect's console log keeps its one-line messages but not the tracebacks: a failure
    prints one `error:` line and the traceback goes to the log file (and to the run's logs
    in the Prefect UI)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter))


@app.command()
def run(config: str = typer.Option("configs/demo.toml", help="TOML config (over configs/defaults.toml)"),
        set_: list[str] = typer.Option([], "--set", callback=_key_values,
                                       help="override, e.g. --set train.max_steps=100"),
        stage: list[str] = typer.Option([], help="build only these stages (repeatable)"),
        from_stage: Optional[str] = typer.Option(None, "--from", help="build this stage and all after it"),
        force: bool = typer.Option(False, help="rebuild the chosen stages even on a cache hit"),
        pin: list[str] = typer.Option([], callback=_key_values, help="use STAGE=VERSION as is")):
    """Run the flow in this process (stages already built with this config are skipped).

    It uses the project's Prefect server if one is up (`c2m up`): the run shows in its UI.
    Otherwise it starts a server for this run alone and stops it when the run ends.
    It never starts the serve process."""
    _run_flow(config, set_, stage or None, from_stage, force, pin)


@app.command()
def plan(config: str = typer.Option("configs/demo.toml", help="TOML config (over configs/defaults.toml)"),
         set_: list[str] = typer.Option([], "--set", callback=_key_values, help="override, as for run"),
         stage: list[str] = typer.Option([], help="build only these stages (repeatable)"),
         from_stage: Optional[str] = typer.Option(None, "--from", help="build this stage and all after it"),
         force: bool = typer.Option(False, help="rebuild the chosen stages even on a cache hit"),
         pin: list[str] = typer.Option([], callback=_key_values, help="use STAGE=VERSION as is"),
         json_: bool = typer.Option(False, "--json", help="print the plan as JSON")):
    """What `c2m run` with the same options would do, and why; runs nothing, needs no server.

    Per stage: its version and cached, build, pinned, missing or not run. A build says why,
    against the stage's newest version in the store: config keys old -> new, code changed
    by module, inputs this run builds anew, forced, or new."""
    cfg = load_config(config, _overrides(set_))
    from flows.plan import Plan, plan_run, render
    from flows.stages import select_stages

    steps = plan_run(Plan(cfg, ArtifactStore(cfg.run.artifacts), select_stages(stage or None, from_stage),
                          force, _pairs(pin)))
    typer.echo(json.dumps([s.to_dict() for s in steps], indent=2) if json_ else render(steps))


@app.command("stage")
def stage_(name: str = typer.Argument(..., help="the stage to re-run"),
           config: str = typer.Option("configs/demo.toml"),
           set_: list[str] = typer.Option([], "--set", callback=_key_values),
           force: bool = typer.Option(False, help="rebuild even on a cache hit"),
           pin: list[str] = typer.Option([], callback=_key_values)):
    """Re-run one stage; its inputs come from the store (the server as for `c2m run`)."""
    _run_flow(config, set_, [name], None, force, pin)


@app.command()
def compare(configs: list[str] = typer.Argument(..., help="two or more config files, one per variant"),
            seeds: int = typer.Option(2, help="training seeds per variant (2 or more for a verdict)"),
            set_: list[str] = typer.Option([], "--set", callback=_key_values,
                                           help="override for every variant, e.g. --set train.max_steps=300")):
    """Did a data change help? Train on each variant and compare eval bits per byte.

    Each variant trains the same model once per seed; the `compare` artifact has a table,
    the eval curves overlaid, and a verdict.

    Stages two runs share are built once; the variants must train the same model shape on
    the same token budget. Runs in this process, like `c2m run`."""
    from flows.compare import check_comparable, variants_from

    sets = _overrides(set_)
    variants = variants_from(configs, base="")
    check_comparable(variants, [v.load(sets) for v in variants], seeds)  # exit 2 before any run

    def call():
        from flows.compare import compare as compare_flow

        return compare_flow(configs=configs, seeds=seeds, overrides=sets, return_state=True)
    result = _in_process(call)
    typer.echo("\n" + Path(result["report"]).read_text())
    typer.echo(f"report: {result['report']}")


@app.command("config")
def config_(config: str = typer.Option("configs/demo.toml", help="TOML config (over the defaults)"),
            set_: list[str] = typer.Option([], "--set", callback=_key_values, help="override"),
            defaults: bool = typer.Option(False, "--defaults",
                                          help="every setting with its default, meaning and range")):
    """Print the config a run would use, checked (or the documented defaults)."""
    from flows.config import render_toml

    typer.echo(render_toml() if defaults else load_config(config, _pairs(set_)).to_toml(), nl=False)


@app.command()
def up(pool: Optional[str] = typer.Option(
        None, "--pool", help="run the deployments through a process worker of this work pool "
                             "(created if absent) instead of the serve process")):
    """Start the local Prefect server and the process running the deployments.

    The serve process, or with --pool a `prefect worker start --pool NAME` (one of the two
    at a time).

    The server keeps its database where PREFECT_API_DATABASE_CONNECTION_URL says
    (e.g. postgresql+asyncpg://user:password@host:5432/prefect), else SQLite under .c2m/."""
    server.start(pool=pool)


@app.command()
def down():
    """Stop exactly the server and the serve or worker process that `c2m up` started."""
    server.stop()


@app.command()
def status():
    """Whether the server runs, which runner (serve, or worker and its pool), and where the
    logs are."""
    typer.echo(json.dumps(server.status(), indent=2))


@app.command()
def demo(root: str = ROOT_OPTION):
    """Serve the deployments and run corpus-to-model/demo end to end through the server.

    Through the work pool's worker when `c2m up --pool` started one."""
    server.start(pool=server.pool())
    typer.echo("$ prefect deployment run corpus-to-model/demo   (here through the Prefect client, "
               "with the stages' progress below)")
    failure = _run_deployment("corpus-to-model/demo")
    if failure:
        runner = "worker" if server.pool() else "serve"
        if failure.startswith("could not start") and server.tail(runner):
            typer.echo(server.tail(runner, 20), err=True)
            failure += f"; the last lines of the {runner} log are above"
        typer.echo(f"error: the demo run failed: {failure}; the {runner} log is "
                   f"{server.STATE / (runner + '.log')}", err=True)
        raise typer.Exit(1)
    store = ArtifactStore(root)
    evaluate = store.path("evaluate", store.resolve("evaluate"))
    model = store.path("train", store.resolve("train"))
    metrics = json.loads((evaluate / "metrics.json").read_text())
    trained = store.manifest("train", model.name)["stats"]
    typer.echo(f"\ntrained in {trained['dtype']} ({trained['dtype_reason']}): "
               f"{trained['tokens_per_s']:,.0f} tokens/s, {trained['seconds']:.0f} s")
    typer.echo(f"validation loss {metrics['loss']:.3f} nats/token "
               f"(unigram entropy {metrics['unigram_entropy']:.3f}), perplexity {metrics['perplexity']:.1f}, "
               f"top-1 accuracy {metrics['accuracy']:.3f}")
    anchors = ", ".join(f"{name} {bpb:.3f}" for name, bpb in metrics["compressors"].items())
    typer.echo(f"bits per byte {metrics['bits_per_byte']:.3f} (unigram {metrics['unigram_bits_per_byte']:.3f}; "
               f"{anchors})")
    held = metrics["eval"]
    typer.echo(f"eval set bits per byte {held['bits_per_byte']:.3f} ({held['docs']} documents held out "
               f"before filtering: the figure `c2m compare` ranks data variants by)")
    typer.echo(f"report: {evaluate / 'report.md'}")
    typer.echo(f"model:  {model / 'model.pt'}")
    typer.echo(f"server: http://{server.HOST}:{server.PORT} (stop it with `c2m down`)")


def _run_deployment(name: str) -> str | None:
    """Run a deployment on the server, showing each stage's progress until the run ends.
    Returns None when it completed, else what went wrong in one line. Ctrl-C cancels the
    run (it would go on in the serve process otherwise)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_UI_URL
    from prefect.states import Cancelling

    from flows import progress

    with contextlib.ExitStack() as stack:
        try:
            client = stack.enter_context(get_client(sync_client=True))
            run = client.create_flow_run_from_deployment(client.read_deployment_by_name(name).id)
        except Exception as exc:  # noqa: BLE001  no server, no deployment, an API that is not Prefect's
            return f"could not start {name}: {_describe(exc)}"
        typer.echo(f"flow run {run.name}: {PREFECT_UI_URL.value()}/runs/flow-run/{run.id}")
        try:
            with progress.TerminalLine() as line:
                final = progress.watch_flow_run(client, run.id, line)
        except KeyboardInterrupt:
            typer.echo(f"\ncancelling flow run {run.id}", err=True)
            with contextlib.suppress(Exception):
                client.set_flow_run_state(run.id, Cancelling(), force=True)
            raise
        if final.state.is_completed():
            return None
        failed = progress.failed_stages(client, run.id)
        if failed:
            return "; ".join(f"stage {stage}: {error}" for stage, error in failed)
        return f"flow run {final.state.name}: {progress.one_line(final.state.message or '')}"


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
    _refuse_encoder(net, found, "generate")
    samples = generate_texts(net, Tokenizer.from_file(str(found["tokenizer"])), prompt, n=n,
                             max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k or None, top_p=top_p if top_p < 1 else None, seed=seed)
    typer.echo(f"# train/{found['version']}", err=True)
    for sample in samples:
        typer.echo(sample["text"])
        typer.echo("-" * 40)


def _refuse_encoder(net, found: dict, command: str) -> None:
    """A usage error (exit 2) for a masked LM: it has nothing to generate or serve."""
    if not net.config.causal:
        typer.echo(f"error: train/{found['version']} is a masked LM (a bidirectional encoder, "
                   f"train.objective = masked): it fills in [MASK] tokens and cannot {command} text; "
                   f"`c2m export` writes it for a Hugging Face fill-mask pipeline", err=True)
        raise typer.Exit(2)


@app.command()
def export(model: str = MODEL_ARGUMENT,
           out: Path = typer.Option(..., "--out", help="folder to write the Hugging Face model into"),
           root: str = ROOT_OPTION):
    """Write a model artifact in Hugging Face format (GPT-2 config, safetensors, tokenizer)."""
    from flows.stages import model_artifact
    from trainer.export import export_hf

    found = model_artifact(model, root)
    path = export_hf(found["model"], found["tokenizer"], out)
    masked = json.loads((path / "config.json").read_text())["model_type"] == "megatron-bert"
    typer.echo(f"train/{found['version']} -> {path}\n"
               f"load it with transformers.AutoModelFor{'MaskedLM' if masked else 'CausalLM'}"
               f".from_pretrained({str(path)!r})")


@app.command()
def serve(model: str = MODEL_ARGUMENT,
          port: int = typer.Option(8000, "--port", min=0, max=65535, help="0: any free port"),
          host: str = typer.Option("127.0.0.1", "--host", help="0.0.0.0: every interface"),
          int8: bool = typer.Option(False, "--int8", help="int8 dynamic quantisation of the Linear layers "
                                                          "(CPU): faster, slightly higher loss"),
          root: str = ROOT_OPTION):
    """Serve a model artifact over HTTP until Ctrl-C: POST /generate, GET /health, GET /model.

    POST /generate takes {prompt, max_tokens, temperature, top_k, top_p, seed, stream,
    truncate}; with stream it answers NDJSON lines. A prompt longer than the model's
    context is refused (413) unless truncate is true. The API's schema is at /docs."""
    import uvicorn
    from tokenizers import Tokenizer

    from flows.stages import model_artifact
    from trainer.http_api import create_app, listen, quantize_int8
    from trainer.model import load_model

    sock = listen(host, port)  # first: a port in use is one error line (exit 1) before any loading
    found = model_artifact(model, root)
    net, _ = load_model(found["model"])
    _refuse_encoder(net, found, "serve")
    trained = found["manifest"]
    info = {"version": found["version"], "sha256": found["sha256"],
            "lineage": [{"stage": s, "version": v} for s, v in found["lineage"]],
            "train": {"config": trained.get("config", {}).get("train", {}), "stats": trained.get("stats", {})}}
    api = create_app(quantize_int8(net) if int8 else net, Tokenizer.from_file(str(found["tokenizer"])),
                     info, int8=int8)
    address = f"[{host}]" if ":" in host else host
    typer.echo(f"serving train/{found['version']}{' (int8)' if int8 else ''} on "
               f"http://{address}:{sock.getsockname()[1]} (schema at /docs; Ctrl-C stops it)")
    server = uvicorn.Server(uvicorn.Config(api, log_level="info"))
    server.run(sockets=[sock])
    # uvicorn stops on Ctrl-C and raises the signal again for us, but asyncio's runner turns
    # that into cancelling a task that may already be ending, and then returns normally (a
    # race, seen in CI): a server that stopped on a signal is an interrupted command. SIGTERM
    # reaches our handler (exit 143) before this line.
    if server.should_exit:
        raise KeyboardInterrupt


@app.command()
def tensorboard(versions: list[str] = typer.Argument(
                    None, help="train versions or prefixes (default: LATEST and the trainings running now)"),
                port: int = typer.Option(6006, "--port", min=1, max=65535),
                root: str = ROOT_OPTION):
    """Open train runs side by side in TensorBoard (on 127.0.0.1), named by version.

    <version>/train: loss, lr, grad norm, tokens/s, MFU; val loss, bits per byte, accuracy.

    <version>/evaluate: the held-out curve over the checkpoints, the samples (text tab)."""
    from flows import board

    code = board.serve(board.runs(ArtifactStore(root), versions or []), port, log=typer.echo)
    if code != 0:
        raise RuntimeError(f"tensorboard exited with code {code} (its messages are above)")


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
    else:
        latest = store.latest(stage)
        for v in store.versions(stage):
            m = store.manifest(stage, v)
            typer.echo(f"{'*' if v == latest else ' '} {v}  {m['finished'][:19]}  {m['duration_s']:8.1f} s  "
                       + " ".join(f"{i['stage']}/{i['version']}" for i in m["inputs"].values()))
    temporaries = store.temporaries(stage)
    if temporaries:
        typer.echo("temporary (`c2m gc` removes those whose run is gone):")
        for t in temporaries:
            typer.echo(f"  {t.describe()}")


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


@app.command()
def why(doc: Optional[str] = typer.Argument(None, help="document id, or the source path or URL it was read from"),
        sample: Optional[str] = typer.Option(None, "--sample", metavar="REASON",
                                             help="instead: documents dropped for REASON, with the text the stage got"),
        n: int = typer.Option(3, "--n", min=1, help="how many --sample shows"),
        run_: Optional[str] = typer.Option(None, "--run", help="the versions a run used (flow run name or id)"),
        pin: list[str] = typer.Option([], callback=_key_values,
                                      help="STAGE=VERSION (repeatable); the other stages follow its lineage"),
        json_: bool = typer.Option(False, "--json", help="print JSON"),
        root: str = ROOT_OPTION):
    """Why a document was kept or dropped, stage by stage.

    Each stage's verdict (kept, dropped and why, duplicate of which document), its length
    there, and the shard and token range of its tokens. Or, with --sample REASON, a few
    documents dropped for that reason.

    Versions: a run's (--run), or pins and their lineage, else the newest consistent ones."""
    from flows import why as lineage_of  # pyarrow and sqlite: not needed by the other commands

    if (doc is None) == (sample is None):
        raise typer.BadParameter("give a DOC or --sample REASON, one of the two")
    if run_ and pin:
        raise typer.BadParameter("give --run or --pin, not both")
    store = ArtifactStore(root)
    versions = lineage_of.choose_versions(store, run_, _pairs(pin))
    if sample is not None:
        found = lineage_of.sample(store, sample, versions, n)
        typer.echo(json.dumps(found, indent=2) if json_ else lineage_of.render_sample(found))
    else:
        verdicts = lineage_of.why(store, doc, versions)
        typer.echo(json.dumps(verdicts, indent=2) if json_ else lineage_of.render(verdicts))



@app.command()
def gc(root: str = ROOT_OPTION):
    """Remove temporary folders whose run is gone (killed or crashed); a live run's stay."""
    store = ArtifactStore(root)
    count, freed = store.gc(log=typer.echo)
    live = [t for t in store.temporaries() if t.alive]
    done = (f"removed {count} temporary {'entry' if count == 1 else 'entries'}, {human_bytes(freed)}"
            if count else "nothing to remove")
    typer.echo(done + (f"; kept {len(live)} that belong to live runs" if live else ""))


@app.command()
def verify(stage: Optional[str] = typer.Argument(None, help="default: every stage"),
           version: Optional[str] = typer.Argument(None, help="version or prefix; default: every version"),
           root: str = ROOT_OPTION):
    """Check artifacts against their manifests; exit 1 on any problem.

    Files: size and sha256 as the manifest lists them, none missing, none extra.

    Document stages: docs in = kept + rejected (Parquet rows, manifest stats, input's kept)."""
    store = ArtifactStore(root)
    if version:
        targets = [(stage, store.resolve(stage, version))]
    else:
        targets = [(s, v) for s in ([stage] if stage else store.stages()) for v in store.versions(s)]
    if not targets:
        raise FileNotFoundError(f"no complete artifacts{' of ' + stage if stage else ''} under "
                                f"{store.root} to verify (`c2m ls` lists what is there)")
    problems = [p for s, v in targets for p in store.verify(s, v)]
    for problem in problems:
        typer.echo(problem)
    if problems:
        typer.echo(f"error: {len(problems)} problems in {len(targets)} versions under {store.root}", err=True)
        raise typer.Exit(1)
    files = sum(len(store.manifest(s, v)["files"]) for s, v in targets)
    typer.echo(f"verified {len(targets)} versions, {files} files under {store.root}: "
               "checksums and document counts match")

def main() -> None:
    """The console script. Exit codes: 0 done; 1 failed (one `error:` line on stderr, the
    traceback in a log file it names); 2 bad command line or config, nothing ran;
    130 interrupted (Ctrl-C); 143 terminated (SIGTERM), after the same clean-up."""
    signal.signal(signal.SIGTERM, _terminated)
    sys.exit(_main())


def _terminated(signum, frame):
    sys.exit(128 + signum)  # `kill` cleans up like Ctrl-C: temporary folders, the run's server


def _main() -> int:
    try:
        # returns the code of a typer.Exit; a KeyboardInterrupt in a command becomes 130
        code = app(prog_name="c2m", standalone_mode=False)
    except _USAGE_ERROR as exc:  # unknown command or option, missing or bad value
        exc.show()
        return exc.exit_code
    except ConfigError as exc:
        for line in str(exc).splitlines():
            typer.echo(f"error: {line}", err=True)
        return 2
    except _CLICK_EXCEPTION as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `c2m ls | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        typer.echo(f"error: {_describe(exc)}", err=True)
        typer.echo(_save_traceback(exc), err=True)
        return 1
    return code if isinstance(code, int) else 0


def _describe(exc: BaseException) -> str:
    """One line: our own errors are written for users; other types get their class name,
    and a KeyError names the key."""
    if isinstance(exc, KeyError) and exc.args:
        text = f"KeyError: missing key {exc.args[0]!r}"
    elif type(exc) in (ValueError, RuntimeError) or isinstance(exc, OSError):
        text = str(exc)  # OSError's text has the errno and the file name
    else:
        text = f"{type(exc).__name__}: {exc}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return "; ".join([first, *(note.strip() for note in getattr(exc, "__notes__", ()))])


KEEP_LOGS = 50  # the newest error logs; older ones are removed


def _save_traceback(exc: BaseException) -> str:
    """Write the full traceback to a new file under the state folder (.c2m/logs/); say where."""
    name = f"c2m-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    text = (f"$ c2m {' '.join(sys.argv[1:])}\n{dt.datetime.now().isoformat()}, cwd {os.getcwd()}\n\n"
            + "".join(traceback.format_exception(exc)))
    for folder in (server.STATE / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        except OSError:
            continue  # a full or read-only disk: try the next place
        for old in sorted(folder.glob("c2m-*.log"))[:-KEEP_LOGS]:
            old.unlink(missing_ok=True)
        return f"the full traceback is in {folder / name}"
    return "could not write a log file; the traceback:\n" + text


if __name__ == "__main__":
    main()
