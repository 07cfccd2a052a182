"""`latflow export --format pyerrors-json|csv|npz`: observable histories that pyerrors, CSV and NumPy readers load.

pyerrors (a test dependency only) must load our JSON and its Gamma method must agree with `latflow analyze
--json`. For one chain the two use the same conventions (analysis/gamma.py), so they agree to rounding. For
several chains pyerrors subtracts each replica's own mean where latflow subtracts the mean over all chains
(Wolff sec. 3): pyerrors' autocorrelation function is then lower by about
D = sum_r N_r (abar_r - abar)^2 / N at every lag, so its C_F(W) = 2 tau_int Gamma(0) by (2W + 1) D, a relative
p = (2W + 1) D / C_F (on average (2W + 1)(R - 1) / N; it is what the data say, not a fit). With the window
moving by a step or two on top, pyerrors' tau_int lies within 2 p + (2W + 1) / N below ours and its error
within p + (2W + 1) / N (over 300 seeds of four AR(1) chains of 5000 the differences reached 0.65 of these
bounds, 0.33 on average). Where the chain means are made equal first, pyerrors reproduces latflow's estimator
to rounding, which shows that the file holds the histories exactly.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import stat_seed

from latflow.analysis.gamma import gamma_method
from latflow.ensemble import EnsembleMeta, EnsembleReader, EnsembleWriter

pe = pytest.importorskip("pyerrors")

S = 1.5  # analysis/report.py: analyze_ensemble(S=1.5), what `latflow analyze` uses
RTOL_SAME = 1e-6  # one chain, or equal chain means: the same estimator, rounding only (tests/test_gamma.py)


def _ok(r) -> None:
    assert r.returncode == 0, str(r)
    assert "Traceback" not in r.stderr + r.stdout, str(r)


def _refused(r, *needles: str) -> str:
    """Exit status 2, one line on stderr naming what went wrong, no traceback."""
    assert r.returncode == 2, str(r)
    assert "Traceback" not in r.stderr + r.stdout, str(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latflow: error: "), str(r)
    for needle in needles:
        assert needle in lines[0], str(r)
    return lines[0]


def _ar1(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    """AR(1) series ``(n,)`` with unit stationary variance."""
    x = np.empty(n)
    x[0] = rng.standard_normal()
    noise = rng.standard_normal(n) * np.sqrt(1 - a * a)
    for i in range(1, n):
        x[i] = a * x[i - 1] + noise[i]
    return x


def _write(path: Path, chains: dict[int, np.ndarray], steps: dict[int, np.ndarray], extra=None, commits: int = 3):
    """A synthetic phi4 ensemble: observable ``x`` ``(n_c,)`` per chain, rows interleaved over ``commits`` commits."""
    meta = EnsembleMeta(
        theory="phi4",
        couplings={"m2": -4.0, "lam": 6.975},
        lattice_shape=(2, 2),
        sampler={"kind": "hmc", "n_samples": max(v.size for v in chains.values())},
        seed=3,
        job='[theory]\nname = "phi4"\n',
    )
    rows = []
    for c, x in chains.items():
        for k, (s, v) in enumerate(zip(steps[c], x)):
            rows.append((k, c, s, v))
    rows.sort()  # step-major, as HMC commits: chains interleaved
    chain = np.array([r[1] for r in rows], dtype=np.int64)
    step = np.array([r[2] for r in rows], dtype=np.int64)
    x = np.array([r[3] for r in rows])
    n = x.size
    data = {
        "fields/phi": np.zeros((n, 2, 2)),
        "markov/chain": chain,
        "markov/step": step,
        "markov/accepted": np.ones(n, bool),
        "weights/log_p": -x,
        "weights/log_w": np.zeros(n),
        "observables/x": x,
    }
    data.update({k: v(chain, step, x) for k, v in (extra or {}).items()})
    with EnsembleWriter.create(path, meta) as w:
        for part in np.array_split(np.arange(n), commits):
            w.append({k: v[part] for k, v in data.items()}, state=b"s")
    return data


def _analyze_json(latflow_cli, tmp_path: Path, name: str) -> dict:
    r = latflow_cli.run(["analyze", name, "--json"], tmp_path)
    _ok(r)
    return json.loads(r.stdout)


def _load(path: Path) -> dict:
    out = pe.input.json.load_json(str(path), verbose=False, full_output=True, gz=path.name.endswith(".gz"))
    return out


def _obs_by_tag(loaded: dict) -> dict:
    items = loaded["obsdata"]
    return {o.tag: o for o in items}


def _agree_exactly(o, ours: dict) -> None:
    """pyerrors' Gamma method on the exported Obs against one `latflow analyze --json` entry: rounding only."""
    o.gamma_method(S=S)
    ens = o.e_names[0]
    assert o.value == pytest.approx(ours["mean"], rel=1e-12, abs=1e-14)
    assert o.dvalue == pytest.approx(ours["err"], rel=RTOL_SAME)
    assert o.e_tauint[ens] == pytest.approx(ours["tau_int"], rel=RTOL_SAME)
    assert o.e_dtauint[ens] == pytest.approx(ours["tau_int_err"], rel=RTOL_SAME)


# -- pyerrors JSON -----------------------------------------------------------------------------------


def test_pyerrors_json_single_chain_real_ensemble(latflow_cli, make_job, tmp_path):
    """One HMC chain written by `latflow run`: every observable without an exact mean agrees to rounding."""
    make_job(tmp_path, "hmc", {"sampler.n_chains": 1, "sampler.n_samples": 400})
    _ok(latflow_cli.run(["run", "job.toml"], tmp_path))
    _ok(latflow_cli.run(["export", "hmc.h5", "--format", "pyerrors-json"], tmp_path))  # default name
    ours = _analyze_json(latflow_cli, tmp_path, "hmc.h5")
    loaded = _load(tmp_path / "hmc.json.gz")
    obs = _obs_by_tag(loaded)
    with EnsembleReader(tmp_path / "hmc.h5") as r:
        assert set(obs) == set(r.names("observables"))
        steps = r.read("markov/step")
        thermalization = r.sampler["thermalization"]
    checked = 0
    for tag, o in obs.items():
        assert o.names == ["hmc|r0"] and o.idl["hmc|r0"] == range(thermalization, thermalization + 400)
        assert list(o.idl["hmc|r0"]) == sorted(steps.tolist())
        if ours[tag]["known_mean"] is None:  # pyerrors knows no exact means: those analyses differ by design
            _agree_exactly(o, ours[tag])
            checked += 1
    assert checked >= 4
    desc = loaded["description"]
    assert desc["theory"] == "phi4" and desc["couplings"] == {"m2": -4.0, "lam": 6.975}
    assert desc["sampler"]["kind"] == "hmc" and "[theory]" in desc["job"]
    assert loaded["version"] == "1.1" and loaded["program"].startswith("latflow ")


def test_pyerrors_json_chains_real_ensemble(latflow_cli, make_job, tmp_path):
    """Four HMC chains: the file holds the histories exactly; the analyses differ only by the chain-mean term."""
    make_job(tmp_path, "hmc", {"sampler.n_samples": 150})
    _ok(latflow_cli.run(["run", "job.toml"], tmp_path))
    _ok(latflow_cli.run(["export", "hmc.h5", "--format", "pyerrors-json", "-o", "hmc.json"], tmp_path))
    ours = _analyze_json(latflow_cli, tmp_path, "hmc.h5")
    obs = _obs_by_tag(_load(tmp_path / "hmc.json"))
    with EnsembleReader(tmp_path / "hmc.h5") as r:
        chain, step = r.read("markov/chain"), r.read("markov/step")
        data = {name: r.read(f"observables/{name}") for name in r.names("observables")}
    for tag, o in obs.items():
        names = sorted(f"hmc|r{c}" for c in np.unique(chain))
        assert o.names == names and o.value == pytest.approx(ours[tag]["mean"], rel=1e-12, abs=1e-14)
        reps = []
        for c in np.unique(chain):
            idx = np.flatnonzero(chain == c)
            idx = idx[np.argsort(step[idx])]
            assert list(o.idl[f"hmc|r{c}"]) == step[idx].tolist()
            # pyerrors' replica values are the stored ones (its mean plus deltas)
            back = o.r_values[f"hmc|r{c}"] + o.deltas[f"hmc|r{c}"]
            np.testing.assert_allclose(back, data[tag][idx], rtol=0, atol=1e-13)
            reps.append(data[tag][idx])
        # equal chain means: the same estimator on both sides
        aligned = [x - x.mean() + ours[tag]["mean"] for x in reps]
        same = pe.Obs(aligned, names, idl=[o.idl[n] for n in names])
        same.gamma_method(S=S)
        res = gamma_method(aligned, S=S)
        assert same.dvalue == pytest.approx(res.err, rel=RTOL_SAME)
        assert same.e_tauint["hmc"] == pytest.approx(res.tau_int, rel=RTOL_SAME)


@pytest.mark.statistical
def test_pyerrors_json_chains_against_analyze(latflow_cli, tmp_path):
    """Four long chains (resumed numbering: chain 2 starts at step 500): pyerrors' tau_int and error lie below
    those of `analyze --json` by the chain-mean term p of the module docstring, within its bounds."""
    rng = np.random.default_rng(stat_seed(4101))
    n, r = 5000, 4
    chains = {c: 0.3 + _ar1(rng, n, 0.8) for c in range(r)}
    steps = {c: np.arange(n) + (500 if c == 2 else 10) for c in range(r)}
    _write(tmp_path / "ar.h5", chains, steps, commits=4)
    _ok(latflow_cli.run(["export", "ar.h5", "--format", "pyerrors-json", "-o", "ar.json.gz"], tmp_path))
    ours = _analyze_json(latflow_cli, tmp_path, "ar.h5")["x"]
    o = _obs_by_tag(_load(tmp_path / "ar.json.gz"))["x"]
    assert o.idl["ar|r2"] == range(500, 500 + n) and o.idl["ar|r0"] == range(10, 10 + n)
    o.gamma_method(S=S)
    assert o.value == pytest.approx(ours["mean"], rel=1e-12, abs=1e-14)
    every = np.concatenate(list(chains.values()))
    d = sum(x.size * (x.mean() - every.mean()) ** 2 for x in chains.values()) / every.size
    width = 2 * ours["window"] + 1
    p = width * d / (2 * ours["tau_int"] * every.var())
    jitter = width / every.size
    tau_diff = o.e_tauint["ar"] / ours["tau_int"] - 1
    err_diff = o.dvalue / ours["err"] - 1
    assert -(2 * p + jitter) < tau_diff < jitter, (tau_diff, p, jitter)
    assert -(p + jitter) < err_diff < jitter, (err_diff, p, jitter)


# -- CSV and npz -------------------------------------------------------------------------------------


def _extras():
    return {
        "observables/corr": lambda c, s, x: np.stack([x, 2 * x, c + 0.5], axis=1),
        "observables/single": lambda c, s, x: (x / 3).astype(np.float32),
    }


def _expected(data: dict) -> tuple[np.ndarray, dict]:
    order = np.lexsort((data["markov/step"], data["markov/chain"]))
    return order, {k: v[order] for k, v in data.items()}


def test_csv_and_npz_round_trip_exactly(latflow_cli, tmp_path):
    rng = np.random.default_rng(5)
    chains = {0: rng.standard_normal(7) / 7, 5: rng.standard_normal(9) * 1e6}
    steps = {0: np.arange(7) * 3 + 2, 5: np.arange(9) + 40}  # thinned numbering, resumed numbering
    data = _write(tmp_path / "e.h5", chains, steps, _extras())
    data["weights/log_w"][:] = 0.0
    _, want = _expected(data)
    for name in ("e.csv", "e.csv.gz"):
        _ok(latflow_cli.run(["export", "e.h5", "--format", "csv", "-o", name], tmp_path))
        raw = (tmp_path / name).read_bytes()
        text = (gzip.decompress(raw) if name.endswith(".gz") else raw).decode()
        rows = list(csv.reader(text.splitlines()))
        header, body = rows[0], rows[1:]
        assert header == ["chain", "step", "accepted", "log_w", "corr[0]", "corr[1]", "corr[2]", "single", "x"]
        cols = {h: [row[i] for row in body] for i, h in enumerate(header)}
        assert len(body) == 16
        np.testing.assert_array_equal(np.array(cols["chain"], int), want["markov/chain"])
        np.testing.assert_array_equal(np.array(cols["step"], int), want["markov/step"])
        np.testing.assert_array_equal(np.array(cols["accepted"], int), want["markov/accepted"].astype(int))
        np.testing.assert_array_equal(np.array(cols["log_w"], float), want["weights/log_w"])
        np.testing.assert_array_equal(np.array(cols["x"], float), want["observables/x"])
        np.testing.assert_array_equal(np.array(cols["single"], np.float32), want["observables/single"])
        for i in range(3):
            np.testing.assert_array_equal(np.array(cols[f"corr[{i}]"], float), want["observables/corr"][:, i])
    _ok(latflow_cli.run(["export", "e.h5", "--format", "npz", "-o", "e.npz", "--observables", "x,corr"], tmp_path))
    with np.load(tmp_path / "e.npz") as z:
        assert sorted(z.files) == ["accepted", "chain", "corr", "log_w", "step", "x"]
        for key, src in [("chain", "markov/chain"), ("step", "markov/step"), ("x", "observables/x")]:
            np.testing.assert_array_equal(z[key], want[src])
            assert z[key].dtype == want[src].dtype
        np.testing.assert_array_equal(z["corr"], want["observables/corr"])
        np.testing.assert_array_equal(z["accepted"], want["markov/accepted"])
    # the same numbering in pyerrors: thinned chain 0 every 3rd step from 2, chain 5 from step 40
    _ok(latflow_cli.run(["export", "e.h5", "--format", "pyerrors-json", "-o", "e.json"], tmp_path))
    obs = _obs_by_tag(_load(tmp_path / "e.json"))
    assert sorted(obs) == ["corr[0]", "corr[1]", "corr[2]", "single", "x"]
    assert obs["x"].idl == {"e|r0": range(2, 23, 3), "e|r5": range(40, 49)}
    assert obs["corr[1]"].value == pytest.approx(2 * obs["x"].value, rel=1e-12)


# -- bad input ---------------------------------------------------------------------------------------


def test_bad_input_is_refused_and_nothing_overwritten(latflow_cli, tmp_path):
    rng = np.random.default_rng(1)
    _write(tmp_path / "e.h5", {0: rng.standard_normal(12)}, {0: np.arange(12)})
    (tmp_path / "taken.csv").write_text("keep")
    (tmp_path / "taken.json.gz").write_text("keep")
    run = latflow_cli.run
    _refused(run(["export", "e.h5", "--format", "xlsx", "-o", "a.x"], tmp_path), "--format", "'xlsx'", "pyerrors-json")
    _refused(run(["export", "e.h5", "--format", "csv", "--observables", "x,nope"], tmp_path), "'nope'", "allowed: x")
    _refused(run(["export", "e.h5", "--format", "csv", "-o", "taken.csv"], tmp_path), "taken.csv", "--force")
    _refused(run(["export", "e.h5", "--format", "pyerrors-json", "-o", "taken.json.gz"], tmp_path), "--force")
    _refused(run(["export", "e.h5", "--format", "pyerrors-json", "-o", "e.txt"], tmp_path), "e.txt", ".json.gz")
    _refused(run(["export", "e.h5", "--format", "npz", "--row", "1"], tmp_path), "--row", "ildg")
    _refused(
        run(["export", "e.h5", "--format", "ildg", "-o", "c.lime", "--observables", "x"], tmp_path), "--observables"
    )
    _refused(run(["export", "missing.h5", "--format", "csv"], tmp_path), "missing.h5")
    _refused(run(["export", "e.h5", "--format", "nersc"], tmp_path), "--format nersc", "-o FILE")
    assert (tmp_path / "taken.csv").read_text() == "keep" and (tmp_path / "taken.json.gz").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.h5", "taken.csv", "taken.json.gz"]
    _ok(run(["export", "e.h5", "--format", "csv", "-o", "taken.csv", "--force"], tmp_path))
    assert (tmp_path / "taken.csv").read_text().startswith("chain,step,accepted,log_w,x\n")


def test_weighted_ensemble_refused_for_pyerrors(latflow_cli, tmp_path):
    """Annealing runs are weighted particles, not chains: pyerrors-json refuses them, csv/npz keep log_w."""
    meta = EnsembleMeta(
        theory="phi4", couplings={"m2": -4.0, "lam": 6.975}, lattice_shape=(1,), sampler={"kind": "smc"}, seed=0
    )
    x = np.linspace(-1, 1, 6)
    rows = {
        "fields/phi": x[:, None],
        "markov/chain": np.zeros(6, np.int64),
        "markov/step": np.arange(6),
        "markov/accepted": np.ones(6, bool),
        "weights/log_p": -(x**2),
        "weights/log_w": x,
        "observables/x": x,
    }
    runs = {
        "annealing/log_z": np.array([0.1]),
        "annealing/ess": np.array([0.9]),
        "annealing/n_particles": np.array([6]),
        "annealing/chain": np.array([0]),
    }
    with EnsembleWriter.create(tmp_path / "w.h5", meta) as w:
        w.append(rows, b"s", runs=runs)
    _refused(latflow_cli.run(["export", "w.h5", "--format", "pyerrors-json"], tmp_path), "weighted", "csv")
    assert not (tmp_path / "w.json.gz").exists()
    _ok(latflow_cli.run(["export", "w.h5", "--format", "npz"], tmp_path))
    with np.load(tmp_path / "w.npz") as z:
        np.testing.assert_array_equal(z["log_w"], x)


def test_damaged_ensemble_refused(latflow_cli, tmp_path):
    _write(tmp_path / "e.h5", {0: np.arange(6.0)}, {0: np.arange(6)})
    with h5py.File(tmp_path / "e.h5", "r+") as f:
        f["fields/phi"][0, 0, 0] = 1.0
    _refused(latflow_cli.run(["export", "e.h5", "--format", "csv"], tmp_path), "e.h5", "damaged")
    assert not (tmp_path / "e.csv").exists()
