"""Shared test helpers.

- ``layer_contract``: the flow-layer contract of docs/DESIGN.md (fixture returning
  :func:`assert_layer_contract`), for every flow layer;
- end-to-end CLI helpers (below).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def assert_layer_contract(
    layer: torch.nn.Module,
    x: torch.Tensor,
    *,
    atol: float = 1e-10,
    n_jacobian: int = 2,
    nontrivial: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the flow-layer contract of docs/DESIGN.md on real fields ``x`` ``[B, ...]`` (float64).

    1. ``forward(x) -> (y, logJ_f)`` and ``reverse(y) -> (x', logJ_r)`` with ``logJ`` of shape ``[B]``;
    2. round trips ``reverse(forward(x)) == x`` and ``forward(reverse(x)) == x``;
    3. ``logJ_f + logJ_r == 0``;
    4. ``logJ_f`` (``logJ_r``) equals ``log|det dy/dx|`` (``log|det dx/dy|``) of the autograd Jacobian,
       per configuration, on the first ``n_jacobian`` configurations;
    5. the batch does not mix: each configuration mapped alone gives the same result;
    6. with ``nontrivial``, the layer is not the identity (so that 1-4 have teeth).

    Gauge layers add their own equivariance check on top. Returns ``(y, logJ_f)``.
    """
    assert x.dtype == torch.float64, "run the contract in float64"
    b = x.shape[0]
    with torch.no_grad():
        y, ld_f = layer.forward(x)
        x_back, ld_r = layer.reverse(y)
        x_rev, ld_rev = layer.reverse(x)
        x_fwd, ld_fwd = layer.forward(x_rev)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ld_f.shape == (b,) and ld_r.shape == (b,)
    zero = torch.zeros(b, dtype=x.dtype)
    torch.testing.assert_close(x_back, x, rtol=0, atol=atol)
    torch.testing.assert_close(x_fwd, x, rtol=0, atol=atol)
    torch.testing.assert_close(ld_f + ld_r, zero, rtol=0, atol=atol)
    torch.testing.assert_close(ld_rev + ld_fwd, zero, rtol=0, atol=atol)
    if nontrivial:
        assert (y - x).abs().max() > 1e-3, "layer acts as the identity: the contract test would be vacuous"
        assert ld_f.abs().max() > 1e-3, "logJ vanishes: the Jacobian check would be vacuous"

    shape = x.shape[1:]
    for i in range(min(b, n_jacobian)):
        for fn, point, expected in ((layer.forward, x[i], ld_f[i]), (layer.reverse, y[i], ld_r[i])):
            jac = torch.autograd.functional.jacobian(
                lambda v, fn=fn: fn(v.reshape(1, *shape))[0].reshape(-1), point.reshape(-1)
            )
            sign, logabsdet = torch.linalg.slogdet(jac)
            assert sign != 0
            torch.testing.assert_close(logabsdet, expected, rtol=0, atol=atol)
        with torch.no_grad():
            y_i, ld_i = layer.forward(x[i : i + 1])
        torch.testing.assert_close(y_i[0], y[i], rtol=0, atol=atol)
        torch.testing.assert_close(ld_i[0], ld_f[i], rtol=0, atol=atol)
    return y, ld_f


@pytest.fixture
def layer_contract() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """:func:`assert_layer_contract`."""
    return assert_layer_contract


# ------------------------------------------------------------------------------------------------
# End-to-end CLI helpers (tests/test_cli.py, tests/test_bad_input.py, tests/test_resume.py).
#
# `latflow_cli.run(args, cwd)` runs `latflow ARGS` in its own process and returns its exit code,
# stdout and stderr. A fresh interpreter spends 5-10 s importing torch (and torch._dynamo, which
# Adam pulls in) on a small machine, so by default the processes are forked from one warm server
# that imported latflow once: each child gets its own cwd, environment, stdin/stdout/stderr
# files and exit status, and runs exactly what the console script runs (`sys.exit(main())`,
# uncaught exceptions print a traceback and exit 1). Set LATFLOW_TEST_CLI=subprocess to run every
# command as `python -m latflow.jobs.cli` in a fresh interpreter instead (slow, same assertions).
import hashlib as _hashlib
import json as _json
import os as _os
import select as _select
import signal as _signal
import subprocess as _subprocess
import sys as _sys
from dataclasses import dataclass as _dataclass
from pathlib import Path as _Path

import pytest as _pytest

_CLI_SERVER_SRC = r"""
import io, json, os, sys, traceback

import torch
torch.set_num_threads(1)
import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: seconds)
import h5py  # noqa: F401
import latflow.analysis  # noqa: F401
import latflow.jobs.progress  # noqa: F401
import latflow.jobs.runner  # noqa: F401
from latflow.jobs import cli

channel_in, channel_out = sys.stdin, sys.stdout


def child(req):
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    fds = [os.open(os.devnull, os.O_RDONLY)]
    for name in ("stdout", "stderr"):
        fds.append(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.argv = ["latflow", *req["argv"]]
    try:
        code = cli.main(req["argv"])
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xFF)


channel_out.write(json.dumps({"ready": os.getpid()}) + "\n")
channel_out.flush()
for line in channel_in:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            try:
                child(req)
            finally:
                os._exit(70)
        reply = {"pid": pid}
    elif req["op"] == "wait":
        _, status = os.waitpid(req["pid"], 0)
        reply = {"code": os.waitstatus_to_exitcode(status)}
    else:
        reply = {"error": f"unknown op {req['op']!r}"}
    channel_out.write(json.dumps(reply) + "\n")
    channel_out.flush()
"""


@_dataclass
class CliResult:
    """Outcome of one `latflow` command: exit code (-N: killed by signal N), stdout, stderr."""

    args: list
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"latflow {' '.join(map(str, self.args))} -> {self.returncode}\n"
            f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"
        )


class CliProcess:
    """A running `latflow` command (see LatflowCli.spawn)."""

    def __init__(self, backend, args, pid, out, err, handle=None):
        self._backend, self.args, self.pid = backend, args, pid
        self._out, self._err, self._handle = out, err, handle
        self.result = None

    def stderr_so_far(self) -> str:
        """What the command has written to stderr up to now (it may still be running)."""
        try:
            return self._err.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        """Whether the command is still running (a finished, not yet collected one is not)."""
        if self.result is not None:
            return False
        if self._handle is not None:
            return self._handle.poll() is None
        if not _os.path.isdir("/proc"):  # pragma: no cover - no procfs: zombies count as running
            try:
                _os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            return True
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

    def kill(self, sig=_signal.SIGKILL) -> None:
        if self.result is None:
            try:
                _os.kill(self.pid, sig)
            except ProcessLookupError:  # pragma: no cover - already reaped
                pass

    def wait(self, timeout: float = 300.0) -> CliResult:
        if self.result is None:
            code = self._backend._wait(self, timeout)
            self.result = CliResult(
                list(self.args),
                code,
                self._out.read_text(encoding="utf-8", errors="replace"),
                self._err.read_text(encoding="utf-8", errors="replace"),
            )
        return self.result


class _ForkServer:
    def __init__(self, env):
        self.proc = _subprocess.Popen(
            [_sys.executable, "-c", _CLI_SERVER_SRC],
            stdin=_subprocess.PIPE,
            stdout=_subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        self._call_reply(None, timeout=300)

    def _call_reply(self, req, timeout):
        if req is not None:
            self.proc.stdin.write(_json.dumps(req) + "\n")
            self.proc.stdin.flush()
        ready, _, _ = _select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("latflow CLI test server died")
        return _json.loads(line)

    def spawn(self, args, cwd, env, out, err):
        req = {
            "op": "spawn",
            "argv": [str(a) for a in args],
            "cwd": str(cwd),
            "env": env,
            "stdout": str(out),
            "stderr": str(err),
        }
        return self._call_reply(req, timeout=60)["pid"]

    def _wait(self, p, timeout):
        reply = self._call_reply({"op": "wait", "pid": p.pid}, timeout=timeout)
        if reply is None:  # over time: kill it, then collect the (now certain) reply
            _os.kill(p.pid, _signal.SIGKILL)
            reply = self._call_reply(None, timeout=60)
            raise AssertionError(f"latflow {' '.join(map(str, p.args))} ran over {timeout} s and was killed")
        return reply["code"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except _subprocess.TimeoutExpired:  # pragma: no cover
                self.proc.kill()
                self.proc.wait()


class _Subprocesses:
    def spawn(self, args, cwd, env, out, err):
        with open(out, "wb") as fo, open(err, "wb") as fe:
            h = _subprocess.Popen(
                [_sys.executable, "-m", "latflow.jobs.cli", *map(str, args)],
                cwd=cwd,
                env=env,
                stdin=_subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
            )
        return h

    def _wait(self, p, timeout):
        try:
            return p._handle.wait(timeout)
        except _subprocess.TimeoutExpired:
            p._handle.kill()
            p._handle.wait()
            raise AssertionError(f"latflow {' '.join(map(str, p.args))} ran over {timeout} s and was killed") from None

    def close(self):
        pass


class LatflowCli:
    """Runs `latflow` commands in their own processes (`run`: to completion; `spawn`: in the background)."""

    def __init__(self, log_dir: _Path, mode: str):
        self.log_dir = log_dir
        self.mode = mode
        self.env = {
            k: v
            for k, v in _os.environ.items()
            if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_LOCALNRANKS", "SLURM_"))
        }
        self.env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        self._backend = _Subprocesses() if mode == "subprocess" else _ForkServer(self.env)
        self._count = 0
        self._live: list = []

    def spawn(self, args, cwd, env=None) -> CliProcess:
        self._count += 1
        out = self.log_dir / f"{self._count:04d}.out"
        err = self.log_dir / f"{self._count:04d}.err"
        full_env = dict(self.env, **(env or {}))
        if self.mode == "subprocess":
            h = self._backend.spawn(args, cwd, full_env, out, err)
            p = CliProcess(self._backend, args, h.pid, out, err, handle=h)
        else:
            p = CliProcess(self._backend, args, self._backend.spawn(args, cwd, full_env, out, err), out, err)
        self._live.append(p)
        return p

    def run(self, args, cwd, *, timeout: float = 300.0, env=None) -> CliResult:
        return self.spawn(args, cwd, env).wait(timeout)

    def close(self) -> None:
        for p in self._live:
            if p.result is None:
                p.kill()
                try:
                    p.wait(60)
                except AssertionError:  # pragma: no cover
                    pass
        self._backend.close()


@_pytest.fixture(scope="session")
def latflow_cli(tmp_path_factory):
    """Session-wide LatflowCli (see the comment above CliResult)."""
    mode = "subprocess" if _os.environ.get("LATFLOW_TEST_CLI") == "subprocess" else "fork"
    cli = LatflowCli(tmp_path_factory.mktemp("latflow-cli-logs"), mode)
    yield cli
    cli.close()


# tiny jobs: a few seconds each on 2 cores
TINY_FLOW_JOB = {
    "theory": {"name": "phi4", "m2": -4.0, "lam": 6.975},
    "lattice": {"shape": [4, 4]},
    "model": {"kind": "affine", "n_layers": 2, "hidden": [4], "kernel_size": 3},
    "train": {"steps": 20, "batch_size": 32, "lr": 0.001, "checkpoint_every": 10, "log_every": 10},
    "sampler": {"kind": "flow-mcmc", "n_samples": 300, "batch_size": 100, "commit_every": 50, "log_every": 100},
    "output": {"path": "ens.h5"},
    "run": {"seed": 1, "device": "cpu", "dtype": "float64"},
}
TINY_HMC_JOB = {
    "theory": {"name": "phi4", "m2": -4.0, "lam": 6.975},
    "lattice": {"shape": [4, 4]},
    "sampler": {
        "kind": "hmc",
        "n_samples": 40,
        "thermalization": 5,
        "n_chains": 4,
        "step_size": 0.1,
        "n_steps": 4,
        "n_tune": 10,
        "commit_every": 10,
        "log_every": 20,
    },
    "output": {"path": "hmc.h5"},
    "run": {"seed": 7},
}
DROP = object()  # make_job: remove this key or section


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, float) and abs(v) == float("inf"):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def job_toml(sections: dict) -> str:
    """TOML text of a job given as {section: {key: value}} (plain values and lists only)."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)


def _make_job(directory, kind: str = "flow", changes: dict | None = None, name: str = "job.toml") -> _Path:
    """Write a tiny job into `directory`; `changes` maps "section.key" (or "section") to a value or DROP."""
    import copy

    sections = copy.deepcopy(TINY_FLOW_JOB if kind == "flow" else TINY_HMC_JOB)
    for key, value in (changes or {}).items():
        section, _, k = key.partition(".")
        if not k:
            if value is DROP:
                sections.pop(section, None)
            else:
                sections[section] = dict(value)
            continue
        table = sections.setdefault(section, {})
        if value is DROP:
            table.pop(k, None)
        else:
            table[k] = value
    path = _Path(directory) / name
    path.write_text(job_toml(sections), encoding="utf-8")
    return path


_make_job.DROP = DROP


@_pytest.fixture(scope="session")
def make_job():
    """`make_job(dir, kind="flow"|"hmc", changes={"train.steps": 5, "theory.lam": make_job.DROP}, name=...)`."""
    return _make_job


def _snapshot(root) -> dict:
    """Every entry under `root`: kind, size, mtime_ns and (files) sha256 -- to prove nothing was touched."""
    root = _Path(root)
    out = {}
    for dirpath, dirnames, filenames in _os.walk(root):
        for name in dirnames + filenames:
            p = _Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_file() and not p.is_symlink():
                try:
                    digest = _hashlib.sha256(p.read_bytes()).hexdigest()
                except PermissionError:
                    digest = "unreadable"
                out[rel] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, digest)
            else:
                out[rel] = ("dir" if p.is_dir() else "other", st.st_mtime_ns, st.st_mode)
    return out


@_pytest.fixture(scope="session")
def dir_snapshot():
    """`dir_snapshot(path)` -> {relative path: (kind, size, mtime_ns, mode, sha256)}."""
    return _snapshot


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use small tensors, which run fastest on one thread (and without oversubscribing
    the cores that subprocess tests share)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------------
# Seeds of statistical tests. Every statistical test draws its seed from `stat_seed(base)`, which adds
# a global offset: `python -m pytest --seed-offset 7` (or LATFLOW_SEED_OFFSET=7) reruns every
# statistical test with independent random numbers. `benchmarks/seed_sweep.py` runs them at many offsets.
SEED_OFFSET_ENV = "LATFLOW_SEED_OFFSET"
_SEED_STRIDE = 1_000_003  # a prime far above every base seed, so offsets never reuse a base seed


def pytest_addoption(parser):
    parser.addoption(
        "--seed-offset",
        type=int,
        default=None,
        help=f"offset added to the seed of every statistical test (default: ${SEED_OFFSET_ENV} or 0)",
    )


def pytest_configure(config):
    offset = config.getoption("--seed-offset")
    if offset is not None:
        _os.environ[SEED_OFFSET_ENV] = str(offset)
    config.addinivalue_line(
        "markers", "statistical: a seeded physics test with z-score bounds (its seed comes from stat_seed)"
    )


def seed_offset() -> int:
    """The global seed offset of this test run (``--seed-offset`` or ``$LATFLOW_SEED_OFFSET``; 0 by default)."""
    text = _os.environ.get(SEED_OFFSET_ENV, "0").strip() or "0"
    return int(text)


def stat_seed(base: int) -> int:
    """Seed of a statistical test: its own ``base`` shifted by the run's global offset."""
    return int(base) + _SEED_STRIDE * seed_offset()


Z_LOG_ENV = "LATFLOW_Z_LOG"


@_pytest.fixture
def record_z(request):
    """``record_z(observable, z, bound=3.0)``: note a z-score of this test (the seed sweep tabulates them).

    ``bound`` is the test's own limit on ``|z|`` for this observable. Appends one JSON line
    ``{"test", "observable", "z", "bound", "offset"}`` to ``$LATFLOW_Z_LOG`` when it is set; does
    nothing otherwise. Call it before asserting on the z-score.
    """

    def record(observable: str, z: float, bound: float = 3.0) -> None:
        path = _os.environ.get(Z_LOG_ENV)
        if path:
            line = {
                "test": request.node.nodeid,
                "observable": str(observable),
                "z": float(z),
                "bound": float(bound),
                "offset": seed_offset(),
            }
            with open(path, "a", encoding="utf-8") as f:
                f.write(_json.dumps(line) + "\n")

    return record


def self_normalised_estimates(
    log_w: torch.Tensor, obs: dict[str, torch.Tensor]
) -> tuple[dict[str, tuple[float, float]], float]:
    """Self-normalised importance-sampling means of ``obs`` (each ``[N]``) with log weights ``log_w`` ``[N]``.

    Returns ``({name: (mean, delta-method error)}, ESS per draw)``: the reference of statistical tests that
    reweight exact or near-exact draws.
    """
    w = torch.exp(log_w - log_w.max())
    w = w / w.sum()
    out = {}
    for k, x in obs.items():
        mean = float((w * x).sum())
        out[k] = (mean, float(torch.sqrt((w**2 * (x - mean) ** 2).sum())))
    return out, float(1.0 / (w**2).sum()) / log_w.numel()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll ``predicate`` every ``interval`` s until it is truthy (returned); ``AssertionError`` after ``timeout`` s."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
