#!/usr/bin/env python
"""What a user sees of a study in a real browser: MLflow's UI and the study's report.html.

Needs Debian's headless Chromium (``apt-get update && apt-get install -y chromium``); no extra Python package.

    python scripts/browser_check.py                                   # everything in a new temp dir
    python scripts/browser_check.py --workdir /tmp/bc --out /tmp/bc/screenshots
    python scripts/browser_check.py --workdir /tmp/bc --reuse        # keep the store of an earlier call

It runs a 2-job multirun of ``model=tiny`` (``quant=w8a8,mixed_paper``, tagged study ``browser_check``) into
``sqlite:///<workdir>/mlflow.db``, builds the report (``python -m transquant.report browser_check tracking.uri=…
report.out=…``), starts ``mlflow server`` on a free loopback port and drives Chromium through the DevTools
protocol over a pipe. Checks, one PASS/FAIL line each (exit 0 only if all pass):

* report-cli           the report CLI takes ``key=value`` overrides
* experiment-tag       the experiment carries ``mlflow.experimentKind=custom_model_development``
* experiment-runs      the experiment page transquant links to (``#/experiments/<id>?workflowType=machine_learning``,
                       :func:`transquant.core.tracking.ui_url`) lists the sweep and, its row expanded, every job's
                       run name
* experiment-accuracy  the runs' chart view shows each job's ``accuracy`` as rendered by MLflow
* run-page             a job's run page (transquant's link) shows its name and accuracy
* report-artifact      the parent's ``report/report.html`` served by ``/get-artifact`` renders its tables (the
                       store's accuracies) and its inline PNG figures, and its screenshot is not blank
* report-in-mlflow     MLflow's artifact viewer shows that report.html (iframe) with the same content

plus an INFO line (not a check): where ``#/experiments/<id>`` without ``workflowType`` lands (MLflow's own
experiment list links there). MLflow 3.17 takes that view from the browser's saved choice, GenAI by default,
whatever the experiment's tags say, so a fresh browser lands on the GenAI overview.

Screenshots (1600x1000) go to ``--out`` (default ``<workdir>/screenshots``). The CLI flags ``--dump-dom`` /
``--screenshot`` with ``--virtual-time-budget`` were not enough: the screenshot raced MLflow's lazily drawn
charts (blank spinners in one try of two) and cannot expand a parent row, hence the DevTools pipe.
"""
from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

STUDY = "browser_check"
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
SIZE = (1600, 1000)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The report's HTML cells and MLflow's widgets round differently; any of these counts as the number.
FORMATS = ("{:.2f}", "{:.1f}", "{:.3f}", "{:.4f}")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


def renderings(x: float) -> set[str]:
    """How a number may appear on a page: fixed decimals, trailing zeros dropped or not."""
    out = set()
    for f in FORMATS:
        s = f.format(x)
        out |= {s, s.rstrip("0").rstrip(".") if "." in s else s}
    return out


def shows(text: str, x: float) -> bool:
    """``x`` appears as a whole number in ``text`` (96.9 is not found inside 96.92)."""
    return any(re.search(rf"(?<![\d.]){re.escape(r)}(?!\d)", text) for r in renderings(x))


# --- Chromium over the DevTools pipe ----------------------------------------------------------------

class Chrome:
    """Headless Chromium driven through ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-framed JSON):
    waits on real page state instead of a virtual-time guess, and needs no websocket package."""

    def __init__(self, exe: str, profile: Path, log: Path):
        cmd_r, self._cmd_w = os.pipe()
        self._evt_r, evt_w = os.pipe()

        def wire() -> None:  # in the child: the pipe ends at fds 3 and 4, whatever numbers they had
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(evt_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.close(a)
            os.close(b)

        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={SIZE[0]},{SIZE[1]}",
                 "--remote-debugging-pipe", "about:blank"],
                preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True)
        os.close(cmd_r)
        os.close(evt_w)
        self._buf, self._id, self.session = b"", 0, None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=SIZE[0], height=SIZE[1], deviceScaleFactor=1,
                  mobile=False)

    def send(self, method: str, timeout: float = 60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._evt_r], [], [], left)[0]:
                    raise TimeoutError(f"chromium: no answer to {method} in {timeout:.0f} s")
                chunk = os.read(self._evt_r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.proc.poll()}) during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:  # anything else is an event: not needed here
                if "error" in reply:
                    raise RuntimeError(f"chromium: {method}: {reply['error'].get('message')}")
                return reply["result"]

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def js(self, expression: str, timeout: float = 120):
        res = self.send("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                        awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait(self, done, timeout: float) -> str:
        """Poll the page text until ``done(text)``; returns the last text either way."""
        deadline, text = time.monotonic() + timeout, ""
        while True:
            try:
                text = self.text()
            except TimeoutError:  # the page's thread is busy (drawing charts on a loaded machine): ask again
                pass
            if done(text) or time.monotonic() > deadline:
                return text
            time.sleep(0.5)

    def screenshot(self, path: Path, full: bool = False) -> Path:
        params = {"format": "png"}
        if full:  # the whole document, capped so a very long page stays a viewable image
            w, h = self.js("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": max(w, SIZE[0]), "height": min(h, 12000), "scale": 1})
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", timeout=300, **params)["data"]))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._evt_r)


def blank(png: Path) -> str | None:
    """Why a screenshot looks empty (one colour nearly everywhere), or None."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("L"), dtype=np.int16)
    background = np.bincount(a.ravel(), minlength=256).argmax()
    ink = float((np.abs(a - background) > 24).mean())
    return None if ink > 0.005 else f"{ink:.2%} of the pixels differ from the background"


# --- store, report, server --------------------------------------------------------------------------

@dataclass
class Store:
    uri: str
    experiment_id: str
    kind: str | None
    parent_id: str
    parent_name: str
    jobs: dict[str, tuple[str, float]] = field(default_factory=dict)  # run id -> (name, accuracy)
    artifacts: list[str] = field(default_factory=list)  # the parent's report/ files


def run_logged(cmd: list[str], cwd: Path, log: Path, timeout: float) -> int:
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              env=clean_env()).returncode


def clean_env() -> dict[str, str]:
    """The children use only the temp store, whatever the caller's shell points MLflow at."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRANSQUANT_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def make_store(work: Path, uri: str, log: Path) -> None:
    cmd = [sys.executable, "-m", "transquant.run", "-m", "model=tiny", "task=synthetic", "train=quick",
           "quant=w8a8,mixed_paper", "profile.enabled=false", "stats.enabled=true", f"tracking.uri={uri}",
           f"paths.cache_dir={work / 'cache'}", f"hydra.sweep.dir={work / 'multirun'}",
           "+hydra.callbacks.study._target_=transquant.studies.search.StudyCallback",
           f"+hydra.callbacks.study.name={STUDY}"]
    if run_logged(cmd, work, log, timeout=1800):
        raise RuntimeError(f"the multirun failed; see {log}")


def make_report(work: Path, uri: str, log: Path) -> tuple[bool, str]:
    """(the key=value syntax worked, how the report was made). Falls back to the argparse flags so the
    browser checks still run while the CLI is being converted."""
    base = [sys.executable, "-m", "transquant.report", STUDY]
    out = work / "reports"
    if run_logged([*base, f"tracking.uri={uri}", f"report.out={out}"], work, log, timeout=900) == 0:
        return True, f"python -m transquant.report {STUDY} tracking.uri=… report.out=…"
    if run_logged([*base, "--tracking-uri", uri, "--out", str(out)], work, log, timeout=900) == 0:
        return False, "key=value overrides rejected; made with the old flags --tracking-uri/--out"
    raise RuntimeError(f"the report failed with both syntaxes; see {log}")


def read_store(uri: str) -> Store:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`transquant.study` = '{STUDY}'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise RuntimeError(f"no sweep tagged transquant.study={STUDY} in {uri}")
    parent = runs[0]
    exp = client.get_experiment(parent.info.experiment_id)
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    # A job that had finished in an earlier sweep is reused, not re-run: the parent names it in a tag.
    reused = [client.get_run(k.split(".", 1)[1]) for k in parent.data.tags if k.startswith("reused.")]
    store = Store(uri, exp.experiment_id, exp.tags.get(KIND_TAG), parent.info.run_id, parent.info.run_name)
    for r in [*children, *reused]:
        store.jobs[r.info.run_id] = (r.info.run_name, r.data.metrics.get("accuracy", float("nan")))
    if not store.jobs:
        raise RuntimeError(f"the sweep {parent.info.run_id} has no job runs")
    store.artifacts = [f.path for f in client.list_artifacts(parent.info.run_id, "report")]
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, uri: str, log: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on loopback. The experiment's artifacts are at a ``file:`` location
    (transquant.core.tracking.artifact_location), which ``/get-artifact`` reads directly: no
    ``--artifacts-destination`` needed (that only places the artifacts of experiments the server creates)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                cwd=work, stdout=out, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=3) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop(proc)
    raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    """The server and its uvicorn workers: its own process group, started above."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- the checks -------------------------------------------------------------------------------------

class Results:
    def __init__(self) -> None:
        self.rows: list[tuple[str, bool, str]] = []
        self.shots: list[Path] = []

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.rows.append((name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)

    @staticmethod
    def info(name: str, detail: str) -> None:
        print(f"INFO  {name}: {detail}", flush=True)

    def shot(self, path: Path) -> Path:
        self.shots.append(path)
        return path


def guarded(res: Results, name: str, fn) -> None:
    """One check's exception is its FAIL line, not the end of the others."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - reported, the next check goes on
        res.add(name, False, f"{type(err).__name__}: {err}")


def ui_url(url: str, exp_id: str, run_id: str | None = None) -> str:
    """The page transquant prints for an experiment or run (its own link builder, so the check follows it)."""
    try:
        from transquant.core.tracking import ui_url as link
    except ImportError:  # an older checkout: the same link by hand
        page = f"experiments/{exp_id}" + (f"/runs/{run_id}" if run_id else "")
        return f"{url}/#/{page}?workflowType=machine_learning"
    return link(url, exp_id, run_id)


def note_default_view(b: Chrome, url: str, s: Store, out: Path, res: Results, timeout: float) -> None:
    b.goto(f"{url}/#/experiments/{s.experiment_id}")

    def settled(t: str) -> bool:
        try:
            where = b.js("location.hash", timeout=30)
        except TimeoutError:
            return False
        return (s.parent_name in t and "Run Name" in t) or ("/overview" in where and "Usage" in t) or "/traces" in where

    text = b.wait(settled, timeout)
    time.sleep(2)
    where = b.js("location.hash")
    b.screenshot(res.shot(out / "experiment_default.png"))
    if s.parent_name in text and "Run Name" in text:
        what = "the runs table"
    elif "workflowType=genai" in where or "/overview" in where or "/traces" in where:
        what = "MLflow's GenAI pages (no runs shown; the 'Model training' switch top left leads to them)"
    else:
        what = "a page still loading or unknown"
    res.info("experiment-default-view",
             f"#/experiments/{s.experiment_id} without workflowType lands on {where}: {what}")


def check_runs(b: Chrome, url: str, s: Store, out: Path, res: Results, timeout: float) -> None:
    b.goto(ui_url(url, s.experiment_id))
    text = b.wait(lambda t: s.parent_name in t, timeout)
    if s.parent_name not in text:
        b.screenshot(res.shot(out / "experiment.png"))
        res.add("experiment-runs", False, f"the sweep '{s.parent_name[:40]}…' is not listed")
        return
    names = [n for n, _ in s.jobs.values()]
    # The parent row is collapsed: expand it as a user would (the button left of the run name).
    b.js(f"""(() => {{
        const cells = [...document.querySelectorAll('[col-id="attributes.`Run Name`"]')];
        const cell = cells.find(c => c.innerText.includes({json.dumps(s.parent_name)}));
        const btn = cell && cell.querySelector('button');
        if (btn) btn.click();
        return Boolean(btn);
    }})()""")
    text = b.wait(lambda t: all(n in t for n in names), timeout)
    time.sleep(1)
    b.screenshot(res.shot(out / "experiment.png"))
    missing = [n for n in names if n not in text]
    res.add("experiment-runs", not missing and "Run Name" in text,
            f"runs table lists the sweep and {len(names) - len(missing)}/{len(names)} job runs"
            + (f"; missing {missing}" if missing else ""))


# The text around each element labelled exactly ``label``: its ancestors up to (not including) the first that
# also holds text matching ``stop`` (a neighbouring chart or table row), so a number is read where it belongs.
NEAR = """((label, stop) => [...document.querySelectorAll('body *')]
    .filter(e => e.children.length === 0 && e.textContent.trim() === label)
    .map(e => {
        let n = e;
        while (n.parentElement && !new RegExp(stop).test(n.parentElement.innerText || '')) n = n.parentElement;
        return n.innerText || n.textContent || '';
    }))"""


def near(b: Chrome, label: str, stop: str) -> list[str]:
    try:
        return b.js(f"{NEAR}({json.dumps(label)}, {json.dumps(stop)})") or []
    except TimeoutError:
        return []


def check_accuracy(b: Chrome, url: str, s: Store, out: Path, res: Results, timeout: float) -> None:
    # The table shows no metric column until a user picks one; the chart view draws each metric per run.
    q = urllib.parse.urlencode({"workflowType": "machine_learning", "compareRunsMode": "CHART",
                                "searchFilter": "metrics.accuracy >= 0", "orderByKey": "metrics.`accuracy`",
                                "orderByAsc": "false"})
    b.goto(f"{url}/#/experiments/{s.experiment_id}/runs?{q}")

    def card() -> str:  # the chart titled "accuracy", not accuracy_drop, fp32_accuracy, …
        texts = near(b, "accuracy", "accuracy_|fp32_accuracy")
        return max(texts, key=lambda t: sum(shows(t, a) for _, a in s.jobs.values()), default="")

    def done(t: str) -> bool:
        return all(n in t for n, _ in s.jobs.values()) and all(shows(card(), a) for _, a in s.jobs.values())

    text = b.wait(done, timeout)
    time.sleep(2)  # the bars are drawn after their numbers are in the DOM
    b.screenshot(res.shot(out / "experiment_charts.png"))
    chart = card()
    got = {n.split(" ")[0]: (a, n in text and shows(chart, a)) for n, a in s.jobs.values()}
    res.add("experiment-accuracy", all(seen for _, seen in got.values()), "accuracy chart: " + ", ".join(
        f"{n} {a:.2f} {'shown' if seen else 'NOT shown'}" for n, (a, seen) in got.items()))


def check_run_page(b: Chrome, url: str, s: Store, out: Path, res: Results, timeout: float) -> None:
    run_id, (name, acc) = next(iter(s.jobs.items()))
    b.goto(ui_url(url, s.experiment_id, run_id))

    def row() -> str:  # the metrics table's row "accuracy", not fp32_accuracy or accuracy_drop
        return next((t for t in near(b, "accuracy", "accuracy_|fp32_accuracy") if shows(t, acc)), "")

    text = b.wait(lambda t: name in t and bool(row()), timeout)
    # Bring the metrics table into view for the screenshot (the overview lists tags first).
    b.js("""(() => { const cell = [...document.querySelectorAll('td, [role=cell], a, span')]
        .find(e => e.innerText && e.innerText.trim() === 'accuracy');
        if (cell) cell.scrollIntoView({block: 'center'}); return Boolean(cell); })()""")
    time.sleep(1)
    b.screenshot(res.shot(out / "run.png"))
    seen = " ".join(row().split())
    res.add("run-page", name in text and bool(seen), f"run {name.split(' ')[0]}: name "
            f"{'shown' if name in text else 'NOT shown'}, " + (f"metrics row '{seen}'" if seen else
                                                               f"accuracy {acc} NOT in a metrics row"))


# What a rendered report page holds: its tables' text, its inline images and whether they decoded.
PAGE_FACTS = """(() => ({
    tables: document.querySelectorAll('table').length,
    tableText: [...document.querySelectorAll('table')].map(t => t.innerText).join('\\n'),
    images: [...document.images].map(i => ({png: i.src.startsWith('data:image/png'),
                                            ok: i.complete && i.naturalWidth > 0})),
}))()"""


def judge_report(facts: dict, s: Store) -> tuple[bool, str]:
    accs = {n.split(" ")[0]: a for n, a in s.jobs.values()}
    missing = [f"{n} {a:.2f}" for n, a in accs.items() if not shows(facts["tableText"], a)]
    pngs = [i for i in facts["images"] if i["png"]]
    broken = [i for i in pngs if not i["ok"]]
    ok = facts["tables"] > 0 and not missing and pngs and not broken
    detail = (f"{facts['tables']} tables, accuracies of {len(accs) - len(missing)}/{len(accs)} jobs in them"
              + (f" (missing {missing})" if missing else "")
              + f", {len(pngs)} inline PNG images ({len(broken)} not decoded)")
    return bool(ok), detail


def check_report(b: Chrome, url: str, s: Store, out: Path, res: Results, timeout: float) -> None:
    if "report/report.html" not in s.artifacts:
        res.add("report-artifact", False, f"report/report.html is not among the parent's artifacts {s.artifacts}")
        return
    art = f"/get-artifact?{urllib.parse.urlencode({'path': 'report/report.html', 'run_uuid': s.parent_id})}"
    with urllib.request.urlopen(url + art, timeout=30) as r:
        status, ctype, disp = r.status, r.headers.get("content-type", ""), r.headers.get("content-disposition", "")
        body = r.read().decode("utf-8", "replace")
    # The endpoint sends Content-Disposition: attachment, so opening its URL downloads the file. Render
    # the served bytes in a page of the server's own origin instead (its plain /health page, no SPA).
    b.goto(f"{url}/health")
    b.wait(lambda t: "OK" in t, timeout)
    b.js(f"""fetch({json.dumps(art)}).then(r => r.text()).then(h => {{
        document.open(); document.write(h); document.close(); return h.length; }})""")
    deadline = time.monotonic() + timeout
    facts = b.js(PAGE_FACTS)
    while time.monotonic() < deadline and not all(i["ok"] for i in facts["images"]):
        time.sleep(0.5)
        facts = b.js(PAGE_FACTS)
    b.screenshot(res.shot(out / "report.png"))
    b.screenshot(res.shot(out / "report_full.png"), full=True)
    ok, detail = judge_report(facts, s)
    empty = blank(out / "report.png")
    res.add("report-artifact", ok and status == 200 and "data:image/png" in body and not empty,
            f"GET {art} -> {status} {ctype} ({disp or 'inline'}); {detail}"
            + (f"; screenshot blank: {empty}" if empty else "; screenshot not blank"))


def check_report_in_mlflow(b: Chrome, url: str, s: Store, out: Path, res: Results, timeout: float) -> None:
    if "report/report.html" not in s.artifacts:
        res.add("report-in-mlflow", False, "report/report.html is not among the parent's artifacts")
        return
    run_page = ui_url(url, s.experiment_id, s.parent_id)
    page, _, query = run_page.partition("?")
    b.goto(f"{page}/artifacts/report/report.html" + (f"?{query}" if query else ""))
    deadline = time.monotonic() + timeout
    src = None
    while time.monotonic() < deadline and not src:
        src = b.js("(document.querySelector('iframe.mlflow-html-iframe') || {}).src || null")
        time.sleep(0.5)
    if not src:
        b.screenshot(res.shot(out / "report_mlflow.png"))
        res.add("report-in-mlflow", False, "no HTML viewer iframe on the run's artifact page")
        return
    # The viewer puts the page in a sandboxed iframe from a blob: URL; the blob is readable from the app.
    html = b.js(f"fetch({json.dumps(src)}).then(r => r.text())")
    time.sleep(3)  # let the iframe paint its figures
    b.screenshot(res.shot(out / "report_mlflow.png"))
    accs = [a for _, a in s.jobs.values()]
    seen = sum(shows(html, a) for a in accs)
    empty = blank(out / "report_mlflow.png")
    ok = "<table" in html and "data:image/png" in html and seen == len(accs) and not empty
    res.add("report-in-mlflow", ok, f"iframe {src[:40]}… holds {html.count('<table')} tables, "
            f"{html.count('data:image/png')} inline PNGs, accuracies of {seen}/{len(accs)} jobs"
            + (f"; screenshot blank: {empty}" if empty else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="store, report, logs (default: a new temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="screenshots (default <workdir>/screenshots)")
    ap.add_argument("--reuse", action="store_true", help="keep the store already in --workdir (no new multirun)")
    ap.add_argument("--chromium", default=None, help="Chromium executable (default: chromium on PATH)")
    ap.add_argument("--timeout", type=float, default=300,
                    help="seconds a page may take to show what it should (minutes on a loaded machine)")
    ap.add_argument("--server-timeout", type=float, default=600,
                    help="seconds mlflow server may take to answer (minutes on a loaded machine)")
    args = ap.parse_args(argv)

    exe = args.chromium or find_chromium()
    if not exe:
        print("FAIL  chromium: not installed (apt-get update && apt-get install -y chromium)")
        return 2
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="browser_check-"))).resolve()
    out = (args.out or work / "screenshots").resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    log = work / "browser_check.log"
    print(f"workdir {work} (log {log})", flush=True)

    if (work / "mlflow.db").exists() and not args.reuse:
        print(f"FAIL  store: {work} already holds a store; pass --reuse to use it or give a new --workdir")
        return 2
    res = Results()
    try:
        if not (args.reuse and (work / "mlflow.db").exists()):
            print("running the 2-job multirun …", flush=True)
            make_store(work, uri, log)
        print("building the report …", flush=True)
        new_cli, how = make_report(work, uri, log)
        res.add("report-cli", new_cli, how)
        store = read_store(uri)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        res.add("store", False, str(err))
        return 1
    res.add("experiment-tag", store.kind == KIND, f"{KIND_TAG}={store.kind}")

    server = browser = None
    try:
        print("starting mlflow server …", flush=True)
        server, url = start_server(work, uri, log, timeout=args.server_timeout)
        print(f"mlflow server at {url}", flush=True)
        browser = Chrome(exe, Path(tempfile.mkdtemp(prefix="profile-", dir=work)), work / "chromium.log")
        try:
            note_default_view(browser, url, store, out, res, args.timeout)
        except (RuntimeError, TimeoutError) as err:
            res.info("experiment-default-view", f"not determined: {err}")
        for name, check in [("experiment-runs", check_runs),
                            ("experiment-accuracy", check_accuracy), ("run-page", check_run_page),
                            ("report-artifact", check_report), ("report-in-mlflow", check_report_in_mlflow)]:
            guarded(res, name, lambda c=check: c(browser, url, store, out, res, args.timeout))
    except (RuntimeError, TimeoutError, OSError) as err:
        res.add("browser", False, str(err))
    finally:
        if browser:
            browser.close()
        if server:
            stop(server)

    print("screenshots:")
    for p in dict.fromkeys(res.shots):
        print(f"  {p}")
    failed = [n for n, ok, _ in res.rows if not ok]
    print(f"{len(res.rows) - len(failed)}/{len(res.rows)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
