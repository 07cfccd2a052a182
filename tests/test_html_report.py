"""``latflow report``: the HTML page and its plots, refusals, and the page rendered in a headless Chromium.

The Chromium test starts Debian's ``chromium`` itself, serves the report from a local HTTP server in a
thread, and asks the browser through the DevTools protocol whether every image loaded and whether the
console logged an error; a deliberately broken page shows that both checks can fail.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.signal import lfilter

from latflow.analysis.html_report import find_model
from latflow.checkpoint import save_atomic
from latflow.ensemble import EnsembleMeta, EnsembleWriter
from latflow.jobs.cli import main

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
N_STEPS, T = 300, 6


def _u1_flow_ensemble(path: Path, rng: np.random.Generator) -> None:
    """A 2-chain flow-MCMC U(1) ensemble: plaquette, integer topological charge, a pion correlator, weights."""
    job = f'[theory]\nname = "u1"\nbeta = 2.0\n\n[output]\npath = "{path.name}"\n'
    meta = EnsembleMeta(
        theory="u1",
        couplings={"beta": 2.0},
        lattice_shape=(T, 4),
        sampler={"kind": "flow-mcmc", "n_samples": N_STEPS, "batch_size": 100},
        seed=1,
        job=job,
        model_sha256="ab" * 32,
    )
    n = 2 * N_STEPS
    t = np.arange(T)
    corr = np.cosh(0.6 * (t - T / 2))[None, :] * (1 + 0.05 * rng.standard_normal((n, T)))
    rows = {
        "fields/links": rng.uniform(-np.pi, np.pi, size=(n, 2, T, 4)),
        "markov/chain": np.tile([0, 1], N_STEPS),
        "markov/step": np.repeat(np.arange(N_STEPS), 2),
        "markov/accepted": rng.random(n) < 0.6,
        "weights/log_p": rng.normal(size=n),
        "weights/log_q": rng.normal(size=n),
        "weights/log_w": np.zeros(n),
        "weights/proposal_log_w": rng.normal(0, 1.0, size=n),
        "observables/plaquette": 0.7 + 0.01 * lfilter([1.0], [1.0, -0.7], rng.standard_normal(n)),
        "observables/topological_charge": np.rint(rng.normal(0, 1.2, size=n)),
        "observables/pion_correlator": corr,
    }
    with EnsembleWriter.create(path, meta) as w:
        half = n // 2
        w.append({k: v[:half] for k, v in rows.items()}, b"state 0")
        w.append({k: v[half:] for k, v in rows.items()}, b"state 1")


def _weighted_ensemble(path: Path, rng: np.random.Generator) -> None:
    """Four annealing runs of 64 particles (importance sampling of a Gaussian)."""
    meta = EnsembleMeta(
        theory="phi4", couplings={"m2": -4.0, "lam": 6.975}, lattice_shape=(2, 2), sampler={"kind": "smc"}, seed=2
    )
    with EnsembleWriter.create(path, meta) as w:
        for r in range(4):
            x = rng.normal(0, 1.5, size=(64, 2, 2))
            m = x.mean(axis=(1, 2))
            lw = -0.5 * m**2 + 0.3 * rng.standard_normal(64)
            top = lw.max()
            e = np.exp(lw - top)
            rows = {
                "fields/phi": x,
                "markov/chain": np.full(64, r),
                "markov/step": np.arange(64),
                "markov/accepted": np.ones(64, bool),
                "weights/log_p": lw,
                "weights/log_q": np.zeros(64),
                "weights/log_w": lw,
                "observables/magnetization": m,
                "observables/phi2": (x**2).mean(axis=(1, 2)),
            }
            runs = {
                "annealing/log_z": np.array([top + np.log(e.mean())]),
                "annealing/ess": np.array([e.sum() ** 2 / (64 * (e**2).sum())]),
                "annealing/n_particles": np.array([64]),
                "annealing/chain": np.array([r]),
            }
            w.append(rows, f"state {r}".encode(), runs=runs)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Two ensembles and the flow ensemble's training checkpoint (found from its job record)."""
    d = tmp_path_factory.mktemp("report-inputs")
    rng = np.random.default_rng(11)
    flow, smc = d / "u1_flow.h5", d / "smc.h5"
    _u1_flow_ensemble(flow, rng)
    _weighted_ensemble(smc, rng)
    steps = list(range(50))
    history = {
        "step": steps,
        "loss": [5.0 * math.exp(-s / 20) for s in steps],
        "ess": [0.6 * (1 - math.exp(-s / 15)) for s in steps],
        "kl": [math.exp(-s / 20) for s in steps],
        "lr": [1e-3] * 50,
    }
    save_atomic({"model": {}, "step": 50, "complete": True, "history": history}, d / "u1_flow.model.pt")
    return {"flow": flow, "smc": smc, "model": d / "u1_flow.model.pt", "dir": d}


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "rep"
    assert main(["report", str(inputs["flow"]), str(inputs["smc"]), "-o", str(out)]) == 0
    return out


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def test_report_page_and_plots(report, inputs):
    page = (report / "index.html").read_text(encoding="utf-8")
    assert page.count("<section ") == 2
    srcs = _img_sources(page)
    assert len(srcs) == len(set(srcs)) > 10
    for src in srcs:  # relative links to PNG files beside the page
        assert "/" not in src and src.endswith(".png") and (report / src).is_file(), src
    # nothing from the network: no scripts, no external links or stylesheets
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # the analysis table and warnings of both ensembles, the plots asked for
    assert "plaquette" in page and "value(error)" in page and "Warnings" in page
    assert "weighted ensemble" in page  # the plain-text table of the annealing runs
    names = set(srcs)
    for expected in (
        "e1_plaquette_history.png",
        "e1_plaquette_rho.png",
        "e1_plaquette_tau_int.png",
        "e1_topological_charge_sectors.png",
        "e1_pion_correlator_correlator.png",
        "e1_proposal_log_w.png",
        "e1_training.png",  # the model found from the ensemble's job record
        "e2_magnetization_histogram.png",
        "e2_log_w.png",
    ):
        assert expected in names, expected
    assert str(inputs["model"]) in page


def test_report_model_option_and_pdf(inputs, tmp_path):
    other = tmp_path / "other.model.pt"
    save_atomic({"history": {"log_z": [0.1, 0.2], "ess": [0.5, 0.6], "loss": [2.0, 1.0]}}, other)
    out = tmp_path / "rep"
    argv = ["report", str(inputs["smc"]), "-o", str(out), "--model", str(other), "--pdf", "--observable", "phi2"]
    assert main(argv) == 0
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "e1_training.png" in page and str(other) in page
    assert (out / "e1_training.pdf").read_bytes()[:5] == b"%PDF-"
    assert "e1_phi2_histogram.png" in page and "magnetization_histogram" not in page  # only the one asked for
    assert "<td>magnetization</td>" in page  # the table keeps every observable


def test_find_model_from_the_job_record(tmp_path):
    ens = tmp_path / "a.h5"
    (tmp_path / "a.model.pt").write_bytes(b"x")
    assert find_model(ens, '[output]\npath = "somewhere/a.h5"\n') == tmp_path / "a.model.pt"
    (tmp_path / "m.pt").write_bytes(b"x")
    record = '[output]\npath = "a.h5"\n# latflow command-line overrides applied to this job:\n'
    record += '#   --set output.model="m.pt"\n'
    assert find_model(ens, record) == tmp_path / "m.pt"
    assert find_model(ens, '[output]\nmodel = "gone.pt"\n') is None


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("latflow: error: ")
    return err


def test_refusals(inputs, tmp_path, capsys):
    out = tmp_path / "rep"
    err = _one_line_error(capsys, ["report", str(tmp_path / "nope.h5"), "-o", str(out)])
    assert "nope.h5: no such file" in err
    damaged = tmp_path / "damaged.h5"
    shutil.copy(inputs["flow"], damaged)
    with h5py.File(damaged, "r+") as f:
        f["fields/links"][3, 0, 0, 0] += 0.5
    err = _one_line_error(capsys, ["report", str(damaged), "-o", str(out)])
    assert "damaged.h5: damaged ensemble" in err
    assert not out.exists()  # refused before anything was written
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _one_line_error(capsys, ["report", str(inputs["smc"]), "-o", str(out)])
    assert "not empty" in err and "--force" in err
    fresh = tmp_path / "fresh"
    err = _one_line_error(capsys, ["report", str(inputs["smc"]), "-o", str(fresh), "--model", "missing.pt"])
    assert "missing.pt: --model: no such file" in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    err = _one_line_error(capsys, ["report", str(inputs["smc"]), "-o", str(fresh), "--model", str(junk)])
    assert "junk.pt: not a readable training checkpoint" in err
    err = _one_line_error(capsys, ["report", str(inputs["smc"]), "-o", str(fresh), "--observable", "nope"])
    assert "--observable 'nope': no such observables/ dataset; allowed: magnetization, phi2" in err
    assert not fresh.exists()
    assert main(["report", str(inputs["smc"]), "-o", str(out), "--force"]) == 0
    assert (out / "index.html").is_file() and (out / "keep.txt").read_text() == "mine"


# ---- headless Chromium ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


@contextlib.contextmanager
def _http_server(root: Path):
    """Serve ``root`` on 127.0.0.1 from a thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def _chromium(profile: Path, log: Path):
    """Start headless Chromium with a DevTools port; yields the port; stops it (its PID's group) at the end."""
    port = _free_port()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--remote-debugging-port={port}",
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [CHROMIUM, *flags, "about:blank"], stdout=subprocess.DEVNULL, stderr=err, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start: {log.read_text(errors='replace')[-2000:]}") from None
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # helper processes it started (same process group)


class _DevTools:
    """A minimal DevTools-protocol client of one page target."""

    def __init__(self, port: int) -> None:
        import websocket

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        msg_id = self.next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == msg_id:
                assert "error" not in msg, msg
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))

    def drain(self, seconds: float) -> None:
        """Collect the events of the next ``seconds``."""
        import websocket

        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                self.events.append(json.loads(self.ws.recv()))
            except websocket.WebSocketTimeoutException:
                break

    def close(self) -> None:
        self.ws.close()


_IMAGES_JS = "JSON.stringify(Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]))"


def _load_page(dt: _DevTools, url: str) -> tuple[list, list[str], list[str]]:
    """Navigate to ``url``; returns the images ``[src, complete, naturalWidth]``, the console errors and the
    URLs requested."""
    dt.events.clear()
    dt.call("Page.navigate", url=url)
    dt.wait_for("Page.loadEventFired")
    dt.drain(0.5)  # late console messages
    images = json.loads(dt.call("Runtime.evaluate", expression=_IMAGES_JS, returnByValue=True)["result"]["value"])
    errors, requests = [], []
    for ev in dt.events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            errors.append(p.get("exceptionDetails", {}).get("text", "exception"))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    return images, errors, requests


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; CI installs it)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    root = tmp_path / "site"
    shutil.copytree(report, root / "report")
    (root / "broken").mkdir()
    (root / "broken" / "index.html").write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png" alt="x"><script>console.error("deliberate error")</script></body></html>'
    )
    with _http_server(root) as base, _chromium(tmp_path / "profile", tmp_path / "chromium.log") as port:
        dt = _DevTools(port)
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                dt.call(f"{domain}.enable")
            images, errors, requests = _load_page(dt, f"{base}/report/index.html")
            bad_images, bad_errors, _ = _load_page(dt, f"{base}/broken/index.html")
        finally:
            dt.close()
    page = (report / "index.html").read_text(encoding="utf-8")
    assert [src for src, _, _ in images] == _img_sources(page)
    not_loaded = [src for src, complete, width in images if not (complete and width > 0)]
    assert not not_loaded, f"images that did not load: {not_loaded}"
    assert errors == [], errors
    assert requests and all(u.startswith(base + "/report/") for u in requests), requests  # nothing else fetched
    # the checks can fail: a broken image and a console error are seen
    assert bad_images == [["missing.png", True, 0]]
    assert any("deliberate error" in e for e in bad_errors) and any("missing.png" in e for e in bad_errors), bad_errors
