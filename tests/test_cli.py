"""End-to-end tests of the ``latflow`` command line on tiny jobs (4x4 phi^4, seconds each).

Every command runs in its own process (``latflow_cli`` in conftest.py); files are checked with
h5py and the library's own readers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from latflow.ensemble import ROW_GROUPS, EnsembleReader

COMMANDS = ("train", "sample", "run", "analyze", "verify")
GAMMA_KEYS = {"mean", "err", "tau_int", "tau_int_err", "n"}


def _ok(r) -> None:
    assert r.returncode == 0, str(r)
    assert "Traceback" not in r.stderr + r.stdout, str(r)


def _observable_entries(path: Path) -> list[str]:
    """Names `analyze` reports for the observables/ datasets: `name`, or `name[i]` for (n, k) ones."""
    names = []
    with h5py.File(path, "r") as f:
        for name, ds in f["observables"].items():
            names += [name] if ds.ndim == 1 else [f"{name}[{i}]" for i in range(ds.shape[1])]
    return names


def _check_markov_order(path: Path, n_chains: int, n_steps: int, first: int = 0) -> None:
    """Every chain has n_steps rows in Markov order: consecutive markov/step from `first`.

    (Thermalisation steps are Markov time too: after `thermalization` = 5 the first row is step 5.)
    """
    with EnsembleReader(path) as r:
        chain, step = r.read("markov/chain"), r.read("markov/step")
    assert sorted(set(chain.tolist())) == list(range(n_chains))
    for c in range(n_chains):
        steps = step[chain == c]
        np.testing.assert_array_equal(steps, np.arange(first, first + n_steps), err_msg=f"chain {c}")


@pytest.fixture(scope="module")
def flow(tmp_path_factory, latflow_cli, make_job):
    """`latflow train` then `latflow sample` of the tiny flow job (300 rows, commits of 50)."""
    d = tmp_path_factory.mktemp("cli-flow")
    job = make_job(d, "flow")
    train = latflow_cli.run(["train", "job.toml"], d)
    sample = latflow_cli.run(["sample", "job.toml"], d) if train.returncode == 0 else None
    return SimpleNamespace(dir=d, job=job, train=train, sample=sample, ens=d / "ens.h5", model=d / "ens.model.pt")


# --- help --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ("",) + COMMANDS)
def test_help(command, latflow_cli, tmp_path):
    r = latflow_cli.run([command, "--help"] if command else ["--help"], tmp_path)
    _ok(r)
    assert r.stdout.startswith("usage: latflow" + (f" {command}" if command else ""))
    for c in COMMANDS if not command else ():
        assert c in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_version(latflow_cli, tmp_path):
    import latflow

    r = latflow_cli.run(["--version"], tmp_path)
    _ok(r)
    assert r.stdout.strip() == f"latflow {latflow.__version__}"


def test_console_script_help(tmp_path):
    """The installed `latflow` script (a fresh interpreter, not the warm test server)."""
    exe = shutil.which("latflow") or str(Path(sys.executable).with_name("latflow"))
    if not Path(exe).exists():
        pytest.skip("console script `latflow` is not installed")
    p = subprocess.run(
        [exe, "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: latflow")


# --- train, sample, analyze, verify --------------------------------------------------------


def test_train_then_sample(flow):
    _ok(flow.train)
    _ok(flow.sample)
    from latflow import checkpoint

    state = checkpoint.load(flow.model)
    assert state["complete"] is True and state["step"] == 20
    assert flow.ens.exists()
    with EnsembleReader(flow.ens) as r:
        assert r.n_committed == 300
        assert r.sampler["kind"] == "flow-mcmc"
    assert sorted(p.name for p in flow.dir.iterdir()) == ["ens.h5", "ens.model.pt", "job.toml"]


def test_analyze_json(flow, latflow_cli):
    r = latflow_cli.run(["analyze", "--json", "ens.h5"], flow.dir)
    _ok(r)
    out = json.loads(r.stdout)
    names = _observable_entries(flow.ens)
    assert len(names) >= 5
    for name in names + ["acceptance"]:
        assert name in out, f"no entry for {name}: {sorted(out)}"
        entry = out[name]
        assert GAMMA_KEYS <= set(entry), (name, entry)
        assert entry["n"] == 300
        for key in ("mean", "err", "tau_int"):
            assert math.isfinite(entry[key]), (name, entry)
        assert entry["err"] >= 0
    assert 0 <= out["acceptance"]["mean"] <= 1
    # the means are those of the stored rows (one chain, no weights)
    with EnsembleReader(flow.ens) as e:
        for name in names:
            if "[" not in name:
                assert out[name]["mean"] == pytest.approx(float(np.mean(e.read(f"observables/{name}"))), rel=1e-12)
        assert out["acceptance"]["mean"] == pytest.approx(float(np.mean(e.read("markov/accepted"))))


def test_analyze_table(flow, latflow_cli):
    r = latflow_cli.run(["analyze", "ens.h5"], flow.dir)
    _ok(r)
    for name in _observable_entries(flow.ens):
        assert name in r.stdout


def test_verify_ok_then_damaged(flow, latflow_cli, tmp_path):
    shutil.copy2(flow.ens, tmp_path / "ens.h5")
    r = latflow_cli.run(["verify", "ens.h5"], tmp_path)
    _ok(r)
    assert r.stdout.startswith("OK") and "fields/phi" in r.stdout
    # flip one byte of one committed configuration
    with h5py.File(tmp_path / "ens.h5", "r+") as f:
        ds = f["fields/phi"]
        row = np.array(ds[123])
        raw = row.reshape(-1).view(np.uint8).copy()
        raw[5] ^= 0x01
        ds[123] = raw.view(row.dtype).reshape(row.shape)
        assert not np.array_equal(ds[123], row)
    r = latflow_cli.run(["verify", "ens.h5"], tmp_path)
    assert r.returncode == 1, str(r)
    assert "Traceback" not in r.stdout + r.stderr
    assert "fields/phi" in r.stdout + r.stderr
    assert "OK" not in r.stdout


def test_flow_ensemble_metadata_and_order(flow, monkeypatch):
    from latflow.flows import model_sha256
    from latflow.jobs import runner
    from latflow.jobs.config import load_job

    with h5py.File(flow.ens, "r") as f:
        a = f.attrs
        assert a["format"] == "latflow-ensemble" and int(a["format_version"]) == 1
        assert a["theory"] == "phi4"
        assert json.loads(a["couplings"]) == {"m2": -4.0, "lam": 6.975}
        assert list(a["lattice_shape"]) == [4, 4]
        assert int(a["seed"]) == 1
        assert json.loads(a["sampler"])["kind"] == "flow-mcmc"
        assert a["job"] == flow.job.read_text(encoding="utf-8")
        sha = a["model_sha256"]
        assert re.fullmatch(r"[0-9a-f]{64}", sha), sha
        assert set(f) >= set(ROW_GROUPS)
    monkeypatch.chdir(flow.dir)
    job = load_job("job.toml")
    import torch

    assert model_sha256(runner.load_model(job, torch.device("cpu"))) == sha
    _check_markov_order(flow.ens, n_chains=1, n_steps=300, first=100)  # default burn-in: one batch of 100


def test_progress_lines_when_stderr_is_not_a_tty(flow):
    """Batch jobs get a log line every log_every steps (train: 10 of 20, sample: 100 of 300)."""
    train = [int(m) for m in re.findall(r"latflow train (\d+)/20 ", flow.train.stderr)]
    assert train == [10, 20], flow.train.stderr
    sample = [int(m) for m in re.findall(r"latflow sample (\d+)/300 ", flow.sample.stderr)]
    assert sample == [100, 200, 300], flow.sample.stderr
    assert "\r" not in flow.train.stderr + flow.sample.stderr  # no progress bar
    for r in (flow.train, flow.sample):
        assert re.search(r"latflow job job\.toml \(1 rank\(s\)\): \{", r.stderr), r.stderr  # every setting logged


# --- overrides, run, force ------------------------------------------------------------------


def test_overrides_land_in_the_file(latflow_cli, make_job, tmp_path):
    job = make_job(tmp_path, "flow", {"lattice.shape": [6, 6], "theory.lam": 2.0, "sampler.n_samples": 100})
    args = ["run", "job.toml", "--set", "lattice.shape=[4,4]", "--set", "theory.lam=0.5", "--out", "other.h5"]
    r = latflow_cli.run(args, tmp_path)
    _ok(r)
    assert "ensemble: other.h5" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml", "other.h5", "other.model.pt"]
    with h5py.File(tmp_path / "other.h5", "r") as f:
        assert list(f.attrs["lattice_shape"]) == [4, 4]
        assert json.loads(f.attrs["couplings"]) == {"m2": -4.0, "lam": 0.5}
        assert f["fields/phi"].shape[1:] == (4, 4)
        record = f.attrs["job"]
    # the recorded job is the file plus the command-line changes that made this ensemble
    assert record.startswith(job.read_text(encoding="utf-8"))
    for change in ("--set lattice.shape=[4,4]", "--set theory.lam=0.5", "--out other.h5"):
        assert change in record


def test_run_hmc_then_force(latflow_cli, make_job, tmp_path):
    make_job(tmp_path, "hmc", name="hmc.toml")
    r = latflow_cli.run(["run", "hmc.toml"], tmp_path)
    _ok(r)
    for word in ("observable", "magnetization", "acceptance", "ensemble: hmc.h5"):
        assert word in r.stdout, r.stdout
    ens = tmp_path / "hmc.h5"
    with EnsembleReader(ens) as e:
        assert e.n_committed == 40 * 4
        assert e.sampler["kind"] == "hmc" and e.sampler["n_chains"] == 4
        assert e.attrs["model_sha256"] == ""
    _check_markov_order(ens, n_chains=4, n_steps=40, first=5)
    assert latflow_cli.run(["verify", "hmc.h5"], tmp_path).returncode == 0

    # --force replaces it (here: with a shorter run)
    r = latflow_cli.run(["sample", "hmc.toml", "--force", "--set", "sampler.n_samples=10"], tmp_path)
    _ok(r)
    with EnsembleReader(ens) as e:
        assert e.n_committed == 10 * 4
        assert e.sampler["n_samples"] == 10
    _check_markov_order(ens, n_chains=4, n_steps=10, first=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hmc.h5", "hmc.toml"]  # no temporary left behind
    r = latflow_cli.run(["verify", "hmc.h5"], tmp_path)
    _ok(r)


# --- divergence -----------------------------------------------------------------------------


def test_diverging_training_exits_3_and_keeps_the_last_good_checkpoint(latflow_cli, make_job, tmp_path):
    # three good steps, then training is continued with lam = 1e307, where lam phi^4 overflows
    # to inf for any |phi| > 2.1 (which every batch holds): the first new step diverges
    make_job(tmp_path, "flow", {"train.steps": 3, "train.checkpoint_every": 1, "train.log_every": 1000})
    _ok(latflow_cli.run(["train", "job.toml"], tmp_path))
    good = (tmp_path / "ens.model.pt").read_bytes()
    r = latflow_cli.run(
        ["train", "job.toml", "--resume", "--set", "theory.lam=1e307", "--set", "train.steps=200"], tmp_path
    )
    assert r.returncode == 3, str(r)
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("latflow: error:")]
    assert len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0], r.stderr
    assert "diverged" in errors[0] and "step 4" in errors[0], errors[0]
    from latflow import checkpoint

    assert (tmp_path / "ens.model.pt").read_bytes() == good, "the last good checkpoint was touched"
    state = checkpoint.load(tmp_path / "ens.model.pt")
    assert state["step"] == 3
    assert state["model"], "no weights in the checkpoint"
    for name, t in state["model"].items():
        assert bool(np.isfinite(t.numpy()).all()), name
    assert not (tmp_path / "ens.h5").exists()


def test_training_diverging_at_once_says_no_checkpoint_was_written(latflow_cli, make_job, tmp_path):
    # lam = 1e307: lam phi^4 overflows to inf for any |phi| > 2.1, which the first batch holds
    make_job(tmp_path, "flow", {"theory.lam": 1e307, "train.lr": 1e6, "train.checkpoint_every": 1})
    r = latflow_cli.run(["train", "job.toml"], tmp_path)
    assert r.returncode == 3, str(r)
    assert "Traceback" not in r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("latflow: error: training diverged") and "no checkpoint was written" in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.toml"]


# --- the hint of a missing model reproduces the user's arguments --------------------------------


def test_missing_model_hint_is_a_command_that_works(latflow_cli, make_job, tmp_path):
    import shlex

    make_job(tmp_path, "flow", {"sampler.n_samples": 20, "sampler.commit_every": 10})
    args = ["sample", "job.toml", "--out", "my run.h5", "--set", "train.steps=5"]
    r = latflow_cli.run(args, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, str(r)
    m = re.search(r"no trained model; .* with: (latflow train .+)$", r.stderr.strip())
    assert m, r.stderr
    hint = shlex.split(m.group(1))
    assert hint[:3] == ["latflow", "train", "job.toml"] and "--out" in hint and "my run.h5" in hint, hint
    _ok(latflow_cli.run(hint[1:], tmp_path))  # the hint, as the user would paste it
    assert (tmp_path / "my run.model.pt").exists()
    _ok(latflow_cli.run(args, tmp_path))  # ... and then the original command works
    with EnsembleReader(tmp_path / "my run.h5") as e:
        assert e.n_committed == 20


# --- configurations every save_every steps, compressed ------------------------------------------

U1_HMC = {
    "theory": {"name": "u1", "beta": 2.0},
    "lattice": {"shape": [8, 8]},
    "sampler": {
        "kind": "hmc",
        "n_samples": 200,
        "thermalization": 10,
        "n_chains": 4,
        "step_size": 0.25,
        "n_steps": 4,
        "n_tune": 20,
        "commit_every": 25,
        "log_every": 1000,
    },
    "output": {"path": "full.h5"},
    "run": {"seed": 5},
}


def test_save_every_keeps_every_observable_and_shrinks_the_file(latflow_cli, tmp_path):
    """The same chain stored whole and every 10th configuration (gzip): observables, weights and Markov
    data are identical, the stored configurations are exactly rows (i + 1) % 10 == 0 of the full file,
    checksums verify, and the file is several times smaller."""
    from conftest import job_toml

    (tmp_path / "u1.toml").write_text(job_toml(U1_HMC), encoding="utf-8")
    _ok(latflow_cli.run(["sample", "u1.toml"], tmp_path))
    thin_args = [
        "sample",
        "u1.toml",
        "--out",
        "thin.h5",
        "--set",
        "output.save_every=10",
        "--set",
        'output.compression="gzip"',
    ]
    _ok(latflow_cli.run(thin_args, tmp_path))
    for name in ("full.h5", "thin.h5"):
        r = latflow_cli.run(["verify", name], tmp_path)
        _ok(r)
        assert "fields/links" in r.stdout
    full, thin = tmp_path / "full.h5", tmp_path / "thin.h5"
    with EnsembleReader(full) as a, EnsembleReader(thin) as b:
        assert a.n_committed == b.n_committed == 200 * 4
        for group in ("markov", "weights", "observables"):
            assert a.names(group) == b.names(group)
            for name in a.names(group):
                np.testing.assert_array_equal(a.read(f"{group}/{name}"), b.read(f"{group}/{name}"), err_msg=name)
        rows = b.read("fields/row")
        step = a.read("markov/step")
        # every chain keeps its steps 19, 29, ... (thermalisation 10: recorded step i = markov/step - 10)
        assert len(rows) == 20 * 4
        np.testing.assert_array_equal((step[rows] - 10 + 1) % 10, 0)
        np.testing.assert_array_equal(b.read("fields/links"), a.read("fields/links")[rows])
        assert json.loads(b.attrs["storage"]) == {"save_every": 10, "compression": "gzip", "compression_level": 4}
        assert json.loads(a.attrs["storage"]) == {"save_every": 1, "compression": "none", "compression_level": 0}
    with h5py.File(thin, "r") as f:
        assert f["fields/links"].compression == "gzip"
        for name in ("plaquette", "topological_charge"):
            assert f[f"observables/{name}"].attrs["description"], name
        stored = f["fields/links"].id.get_storage_size()
    size_full, size_thin = full.stat().st_size, thin.stat().st_size
    links_bytes = 800 * 2 * 8 * 8 * 8  # every configuration, float64
    # a tenth of the configurations, gzip'd (random float64 angles hardly compress: <= 1.05x the raw bytes)
    assert stored <= 1.05 * links_bytes / 10, stored
    # the file loses at least 80 % of the configurations' bytes (the rest of a small file is chunk
    # allocation of the per-row datasets, which does not grow with the configurations)
    assert size_full - size_thin >= 0.8 * links_bytes, (size_full, size_thin)
    # analyze reads the thinned file like any other (the observables are all there)
    r1, r2 = (latflow_cli.run(["analyze", "--json", n], tmp_path) for n in ("full.h5", "thin.h5"))
    _ok(r1)
    _ok(r2)
    assert json.loads(r1.stdout)["plaquette"]["mean"] == json.loads(r2.stdout)["plaquette"]["mean"]


def test_every_dataset_describes_itself(flow):
    """Observables carry the theory's description, the other datasets the format's (ENSEMBLE_FORMAT.md)."""
    _ok(flow.sample)
    with h5py.File(flow.ens, "r") as f:
        for group in ROW_GROUPS:
            for name, ds in f[group].items():
                assert str(ds.attrs.get("description", "")).strip(), f"{group}/{name} has no description"
        assert "V M^2" in f["observables/chi2"].attrs["description"]
        assert "independent draws" in f["weights/proposal_log_w"].attrs["description"]
        assert "thermalization" in f["markov/step"].attrs["description"]
