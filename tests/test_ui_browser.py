"""benchmarks/screenshots.py against a real Prefect server with its UI, in headless Chromium:
it finds the run's artifacts, shoots the pages, tells an embedded image that renders from
a relative link that the UI shows broken, and a link to a report from a dead one."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "screenshots.py"
PREFECT = str(Path(sys.executable).with_name("prefect"))
DEAD = "00000000-0000-4000-8000-000000000000"  # an artifact id no server has


def tiny_png(width: int = 60, height: int = 30) -> bytes:
    rows = b"".join(b"\x00" + bytes((220, 80, 40)) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def screenshots(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """A `prefect server start` of its own, UI included (the test harness serves no UI)."""
    home = tmp_path_factory.mktemp("prefect-ui-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_EPHEMERAL_ENABLED": "false"}
    log = open(home / "server.log", "wb")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, \
                    f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}"
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def flow_run_id(ui_server) -> str:
    """A finished run with a flow-level summary that embeds its plot and links to the
    train report and to an artifact that does not exist, and a task's train report that
    links its plot relative to the artifact folder (what renders broken)."""
    uri = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    api_url = ui_server["PREFECT_API_URL"]
    code = textwrap.dedent(f"""
        from prefect import flow, task
        from prefect.artifacts import create_markdown_artifact

        @task
        def train():
            return create_markdown_artifact(key="train-report", description="train abc",
                                            markdown="# train abc\\n\\n![loss](loss.png)\\n")

        @flow(name="ui-shots")
        def ui_shots():
            report = train()
            create_markdown_artifact(
                key="corpus-to-model-summary", description="run summary",
                markdown=f"# Summary\\n\\n| stage | report |\\n|---|---|\\n"
                         f"| train | [report]({api_url.removesuffix('/api')}/artifacts/artifact/{{report}}) |\\n"
                         f"| evaluate | [report]({api_url.removesuffix('/api')}/artifacts/artifact/{DEAD}) |"
                         "\\n\\n![plot]({uri})\\n")

        state = ui_shots(return_state=True)
        print(state.state_details.flow_run_id)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ui_server, timeout=120, check=True)
    return done.stdout.split()[-1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium: apt-get install chromium")
def test_shots_show_the_summary_and_name_the_broken_plot(ui_server, flow_run_id, tmp_path):
    done = screenshots("--api", ui_server["PREFECT_API_URL"], "--flow-run", flow_run_id,
                       "--out", str(tmp_path), "--timeout", "60")
    assert done.returncode == 1, done.stderr  # the train report's plot is broken
    assert done.stderr.strip().endswith(
        "train-report: 1 broken images; summary: 1 links to missing artifacts"), done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    shots = summary["shots"]
    assert set(shots) == {"run", "summary", "train-report"} and summary["missing"] == []
    assert shots["summary"]["images"] == 1 and shots["summary"]["broken_images"] == []
    assert len(shots["summary"]["artifact_links"]) == 2
    assert shots["summary"]["dead_links"] == [f"{ui_server['PREFECT_API_URL'][:-4]}/artifacts/artifact/{DEAD}"]
    assert shots["train-report"]["broken_images"] == ["loss <loss.png>"]
    assert shots["run"]["url"].endswith(f"/runs/flow-run/{flow_run_id}")
    for shot in shots.values():
        assert png_size(Path(shot["png"])) == (1400, 1000)
        assert shot["bytes"] > 20_000  # a drawn page, not a blank one


def test_no_server_is_one_clear_line(tmp_path):
    if shutil.which("chromium") is None:
        pytest.skip("needs Debian's chromium: apt-get install chromium")
    done = screenshots("--api", f"http://127.0.0.1:{free_port()}/api", "--out", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: no Prefect server answers at"), done.stderr


def test_no_chromium_says_how_to_install_it(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no browser on it
    done = screenshots("--out", str(tmp_path), env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: chromium is not installed: apt-get install chromium"
