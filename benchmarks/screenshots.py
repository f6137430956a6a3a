"""Screenshots of a flow run in the Prefect UI, taken by headless Chromium, and what renders.

The Prefect UI is a JavaScript single-page app: a plain `chromium --screenshot` catches it
half-drawn, and the run page's Artifacts tab cannot be opened by URL (`?tab=Artifacts`
falls back to Logs while the run loads). So this drives Chromium over its DevTools
protocol: open a page, wait until its text stops changing and every image has loaded or
failed, click a tab where needed, then shoot. For each page it also counts the images
the page shows and names those that are broken (a markdown link that the UI cannot
resolve, such as a path relative to the artifact folder).

It looks up the run and its artifacts through the Prefect client and writes:

  run.png           the flow run page on its Artifacts tab (the summary artifact)
  summary.png       the run's summary artifact (key corpus-to-model-summary)
  train-report.png  the run's train report, with its loss plot
  KEY.png           any other artifact of the run asked for with --artifact KEY

Links to artifact pages (the summary's links to each report) are checked too: each must
name an artifact the server has.

    apt-get install chromium   # Debian's package; runs as root with --no-sandbox
    c2m up && c2m demo         # or any run of the flow on the project's server
    .venv/bin/python benchmarks/screenshots.py                    # the newest run
    .venv/bin/python benchmarks/screenshots.py --flow-run <id> --out /tmp/shots

The server defaults to the project's (`PREFECT_API_URL` if exported, else the checkout's
`c2m up` server, port C2M_PORT or 4200). The last line printed is a JSON summary; the exit
status is 1 when a page has a broken image or a dead artifact link, or an artifact is
missing; 2 when Chromium or the server is not there.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows import server  # noqa: E402  (stdlib only: sets the project's Prefect settings)

FLOW = "corpus-to-model"
SUMMARY_KEY = f"{FLOW}-summary"
DEFAULT_ARTIFACTS = (SUMMARY_KEY, "train-report")
DEFAULT_OUT = Path(__file__).resolve().parent / "screenshots"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# Evaluated in the page: is the text there yet, how long is it, which images are broken.
PAGE_STATE_JS = """(expected => {
  const images = [...document.images].filter(i => i.getBoundingClientRect().width > 0
                                            || (i.complete && i.naturalWidth === 0));
  return {
    found: document.body ? document.body.innerText.includes(expected) : false,
    links: [...document.links].map(a => a.href).filter(h => h.includes('/artifacts/artifact/')),
    text: document.body ? document.body.innerText.length : 0,
    loading: images.filter(i => !i.complete).length,
    images: images.length,
    broken: images.filter(i => i.complete && i.naturalWidth === 0)
                  .map(i => (i.getAttribute('alt') || '') + ' <' + (i.getAttribute('src') || '').slice(0, 60) + '>'),
  };
})(%s)"""

# The tallest scrolling content on the page (the UI's panes scroll, the document does not).
CONTENT_HEIGHT_JS = "Math.max(...[...document.querySelectorAll('*')].map(e => e.scrollHeight))"
MAX_HEIGHT = 16000

CLICK_TAB_JS = """(label => {
  const tab = [...document.querySelectorAll('button, a, [role=tab], [role=tablist] > *')]
    .find(e => e.innerText && e.innerText.trim() === label && e.getBoundingClientRect().width > 0);
  if (tab) tab.click();
  return !!tab;
})(%s)"""


class ShotError(RuntimeError):
    """A failure that ends the script with one line."""


def find_browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise ShotError("chromium is not installed: apt-get install chromium")


def check_server(api_url: str) -> None:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=3) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError):
        pass
    raise ShotError(f"no Prefect server answers at {api_url} (start one: c2m up)")


# -- what to shoot ------------------------------------------------------------------

def find_run(flow_run_id: str | None):
    """The flow run to shoot: the one asked for, or the newest started corpus-to-model run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterStartTime
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        if flow_run_id:
            try:
                return client.read_flow_run(flow_run_id)
            except Exception:  # not found, or not an id (Prefect says only "None")
                raise ShotError(f"no flow run {flow_run_id} on {client.api_url}") from None
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW])),
            flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
            sort=FlowRunSort.START_TIME_DESC, limit=1)
    if not runs:
        raise ShotError(f"no {FLOW} flow run has started on this server yet (c2m demo makes one)")
    return runs[0]


def run_artifacts(flow_run_id) -> dict[str, str]:
    """Artifact id by key, of the artifacts this run made (the newest where a key repeats)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])),
            sort=ArtifactSort.CREATED_DESC)
    ids: dict[str, str] = {}
    for artifact in artifacts:
        if artifact.key:
            ids.setdefault(artifact.key, str(artifact.id))
    return ids


# -- the browser --------------------------------------------------------------------

class Browser:
    """One headless Chromium, driven over the DevTools protocol (websockets, a Prefect
    dependency). Pages are shot at a fixed window size; `full_page` takes all of it."""

    def __init__(self, binary: str, width: int, height: int, timeout: float):
        self.width, self.height, self.timeout = width, height, timeout
        self.profile = tempfile.mkdtemp(prefix="c2m-chromium-")
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--mute-audio", f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            self.socket = self._connect()
        except Exception as exc:
            self.close()
            raise ShotError(f"could not drive chromium over its DevTools protocol: {exc}") from None
        self.next_id = 0

    def _connect(self):
        from websockets.sync.client import connect

        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None or time.time() > deadline:
                raise ShotError(f"chromium did not start (exit status {self.process.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        return connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)

    def call(self, method: str, **params):
        from websockets.exceptions import ConnectionClosed

        self.next_id += 1
        try:
            self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
            while True:  # events arrive in between; only our answer counts
                message = json.loads(self.socket.recv(timeout=self.timeout))
                if message.get("id") == self.next_id:
                    break
        except (TimeoutError, ConnectionClosed) as exc:
            raise ShotError(f"chromium did not answer {method}: {exc or 'timed out'}") from None
        if "error" in message:
            raise ShotError(f"chromium: {method} failed: {message['error'].get('message')}")
        return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)

    def settle(self, expected: str, quiet_s: float = 1.0) -> dict:
        """Wait until the page shows `expected`, no image is loading, and its text has not
        changed for `quiet_s`. Returns the page state (images, broken ones)."""
        deadline = time.time() + self.timeout
        last, since = None, time.time()
        while time.time() < deadline:
            state = self.evaluate(PAGE_STATE_JS % json.dumps(expected)) or {}
            if (state.get("found"), state.get("text")) != last:
                last, since = (state.get("found"), state.get("text")), time.time()
            elif state.get("found") and not state.get("loading") and time.time() - since >= quiet_s:
                return state
            time.sleep(0.25)
        raise ShotError(f"the page did not show {expected!r} within {self.timeout:.0f} s")

    def click(self, label: str) -> None:
        if not self.evaluate(CLICK_TAB_JS % json.dumps(label)):
            raise ShotError(f"the page has no visible {label!r} tab or button")

    def screenshot(self, path: Path, full_page: bool) -> None:
        if full_page:  # the UI scrolls an inner pane, not the document: grow the window to fit it
            height = min(self.evaluate(CONTENT_HEIGHT_JS) or self.height, MAX_HEIGHT)
            self.call("Emulation.setDeviceMetricsOverride", width=self.width, height=height,
                      deviceScaleFactor=1, mobile=False)
            time.sleep(1)  # let it lay the taller page out
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.socket.close()  # absent when connecting failed
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


# -- the shots ----------------------------------------------------------------------

def shoot(browser: Browser, url: str, expected: str, path: Path, full_page: bool,
          tab: str | None = None, tab_expected: str | None = None) -> dict:
    started = time.time()
    browser.open(url)
    state = browser.settle(expected)
    if tab:
        browser.click(tab)
        state = browser.settle(tab_expected or expected)
    browser.screenshot(path, full_page)
    return {"png": str(path), "url": url, "bytes": path.stat().st_size,
            "seconds": round(time.time() - started, 1), "images": state["images"],
            "broken_images": state["broken"], "artifact_links": sorted(set(state["links"]))}


def dead_links(links: list[str], known: set[str]) -> list[str]:
    """The artifact-page links whose artifact the server does not have."""
    from prefect import get_client

    dead = []
    with get_client(sync_client=True) as client:
        for link in links:
            artifact_id = link.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
            if artifact_id in known:
                continue
            try:
                client.read_artifact(artifact_id)
            except Exception:
                dead.append(link)
    return dead


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--api", help="Prefect API URL (default: PREFECT_API_URL, else the "
                                      "checkout's server, http://127.0.0.1:4200/api)")
    parser.add_argument("--flow-run", help="flow run id (default: the newest started "
                                           f"{FLOW} run)")
    parser.add_argument("--artifact", action="append", metavar="KEY",
                        help=f"an artifact of the run to shoot, by key (repeatable; default: "
                             f"{' and '.join(DEFAULT_ARTIFACTS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--full-page", action="store_true",
                        help="shoot whole pages, not only the window")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per page")
    args = parser.parse_args(argv)

    if args.api:  # the UI's address works too
        api = args.api.rstrip("/")
        os.environ["PREFECT_API_URL"] = api if api.endswith("/api") else f"{api}/api"
    server.configure()  # before prefect is imported; exported settings win
    api_url = os.environ["PREFECT_API_URL"].rstrip("/")
    ui_url = api_url.removesuffix("/api")
    try:
        binary = find_browser()
        check_server(api_url)
    except ShotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    browser = None
    try:
        run = find_run(args.flow_run)
        artifacts = run_artifacts(run.id)
        print(f"flow run {run.name} ({run.id}), {run.state_name}: "
              f"{len(artifacts)} artifacts: {', '.join(sorted(artifacts))}")
        browser = Browser(binary, args.width, args.height, args.timeout)
        shots = {"run": shoot(browser, f"{ui_url}/runs/flow-run/{run.id}", run.name,
                              args.out / "run.png", args.full_page, tab="Artifacts",
                              tab_expected=SUMMARY_KEY if SUMMARY_KEY in artifacts else "-report")}
        missing = []
        for key in args.artifact or DEFAULT_ARTIFACTS:
            if key not in artifacts:
                missing.append(key)
                continue
            name = "summary" if key == SUMMARY_KEY else key
            shots[name] = shoot(browser, f"{ui_url}/artifacts/artifact/{artifacts[key]}",
                                key, args.out / f"{name}.png", args.full_page)
    except ShotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if browser:
            browser.close()

    for shot in shots.values():
        shot["dead_links"] = dead_links(shot["artifact_links"], set(artifacts.values()))
    for name, shot in shots.items():
        broken = f", broken: {'; '.join(shot['broken_images'])}" if shot["broken_images"] else ""
        print(f"{shot['png']}  {shot['bytes']:,} bytes, {shot['seconds']} s, "
              f"{shot['images']} images{broken}, {len(shot['artifact_links'])} artifact links"
              f"{', dead: ' + ' '.join(shot['dead_links']) if shot['dead_links'] else ''}  ({shot['url']})")
    problems = [f"no artifact {key!r} in run {run.name}" for key in missing]
    problems += [f"{name}: {len(s['broken_images'])} broken images" for name, s in shots.items()
                 if s["broken_images"]]
    problems += [f"{name}: {len(s['dead_links'])} links to missing artifacts" for name, s in shots.items()
                 if s["dead_links"]]
    print(json.dumps({"flow_run": str(run.id), "ui": ui_url, "shots": shots, "missing": missing,
                      "ok": not problems}))
    if problems:
        print(f"error: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
