"""Weighted ensembles (annealing runs): the ``annealing/`` datasets, ``log Z``, crash safety and weighted analysis."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import stat_seed

import latflow.ensemble.writer as writer_module
from latflow.analysis import DerivedObservable, analyze_ensemble, format_table, weighted_estimate
from latflow.analysis.weighted import weighted_estimate_derived
from latflow.ensemble import EnsembleMeta, EnsembleReader, EnsembleWriter, combine_log_z, verify

MU = 0.5  # target N(MU, 1), unnormalised: p(x) = exp(-(x - MU)^2 / 2), Z = sqrt(2 pi)
SIGMA_Q = 1.5  # proposal N(0, SIGMA_Q^2)
EXACT_LOG_Z = 0.5 * math.log(2 * math.pi)


def _meta(**sampler) -> EnsembleMeta:
    return EnsembleMeta(
        theory="gaussian", couplings={"mu": MU}, lattice_shape=(1,), sampler={"kind": "is-runs", **sampler}, seed=0
    )


def _run(chain_id: int, x: np.ndarray, log_w: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Rows and per-run arrays of one run with particles ``x`` ``(N,)`` and final log weights ``log_w`` ``(N,)``."""
    n = x.size
    top = log_w.max()
    log_z = top + math.log(np.mean(np.exp(log_w - top)))
    w = np.exp(log_w - top)
    rows = {
        "fields/phi": x[:, None],
        "markov/chain": np.full(n, chain_id),
        "markov/step": np.arange(n),
        "markov/accepted": np.ones(n, bool),
        "weights/log_p": -0.5 * (x - MU) ** 2,
        "weights/log_q": np.zeros(n),
        "weights/log_w": log_w,
        "observables/x": x,
        "observables/x2": x**2,
    }
    runs = {
        "annealing/log_z": np.array([log_z]),
        "annealing/ess": np.array([w.sum() ** 2 / (n * (w**2).sum())]),
        "annealing/n_particles": np.array([n]),
        "annealing/chain": np.array([chain_id]),
    }
    return rows, runs


def _importance_run(rng: np.random.Generator, chain_id: int, n: int):
    """One run of importance sampling of N(MU, 1) from N(0, SIGMA_Q^2)."""
    x = rng.normal(0.0, SIGMA_Q, size=n)
    log_q = -0.5 * (x / SIGMA_Q) ** 2 - math.log(SIGMA_Q * math.sqrt(2 * math.pi))
    return _run(chain_id, x, -0.5 * (x - MU) ** 2 - log_q)


def _write(path: Path, runs: list, **sampler) -> None:
    with EnsembleWriter.create(path, _meta(**sampler)) as w:
        for i, (rows, per_run) in enumerate(runs):
            w.append(rows, f"state {i}".encode(), runs=per_run)


# -- arithmetic ---------------------------------------------------------------------------------


def test_combine_log_z_against_direct_float64():
    lz = np.array([0.3, -1.2, 0.9, 0.05, -0.4])
    z = np.exp(lz)
    log_z, err = combine_log_z(lz)
    assert log_z == pytest.approx(math.log(z.mean()), rel=1e-14, abs=1e-14)
    assert err == pytest.approx(z.std(ddof=1) / (math.sqrt(lz.size) * z.mean()), rel=1e-12)
    shifted, err_shifted = combine_log_z(lz + 1.0e4)  # exp overflows; the log-space arithmetic does not
    assert shifted == pytest.approx(log_z + 1.0e4, rel=1e-15) and err_shifted == pytest.approx(err, rel=1e-12)
    one, one_err = combine_log_z(lz[:1])
    assert one == pytest.approx(0.3, rel=1e-15) and math.isnan(one_err)
    assert all(math.isnan(v) for v in combine_log_z(np.zeros(0)))


def test_weighted_estimate_by_hand():
    # run 0: W = (1/4, 3/4) on (1, 3): 2.5; run 1: W = (1/4, 1/4, 1/2) on (2, 4, 6): 4.5; Z = (1, 3)
    values = np.array([1.0, 3.0, 2.0, 4.0, 6.0])
    chain = np.array([0, 0, 5, 5, 5])
    log_w = np.log([1.0, 3.0, 1.0, 1.0, 2.0]) + 7.0  # an overall shift changes nothing
    run_log_z = np.log([1.0, 3.0])
    mean, err, method = weighted_estimate(values, chain, log_w, run_log_z)
    # (1 * 2.5 + 3 * 4.5) / 4 = 4; jackknife: leave-one-out values 4.5, 2.5 -> sqrt(1/2 * (1 + 1)) = 1
    assert (mean, err, method) == (pytest.approx(4.0, rel=1e-14), pytest.approx(1.0, rel=1e-12), "runs")
    res = weighted_estimate_derived(lambda m: m**2, [values], chain, log_w, run_log_z)
    assert res.mean == pytest.approx(16.0, rel=1e-14) and res.err == pytest.approx(7.0, rel=1e-12)
    # one run: sqrt(sum W^2 (O - mean)^2) = sqrt((1/4)^2 1.5^2 + (3/4)^2 0.5^2)
    single = weighted_estimate(values[:2], chain[:2], log_w[:2], run_log_z[:1])
    assert single == (pytest.approx(2.5, rel=1e-14), pytest.approx(math.sqrt(0.28125), rel=1e-12), "ess")
    sq = weighted_estimate_derived(lambda m: m**2, [values[:2]], chain[:2], log_w[:2], run_log_z[:1])
    assert sq.mean == pytest.approx(6.25) and sq.err == pytest.approx(5.0 * math.sqrt(0.28125), rel=1e-6)
    # the runs' order is given by run_chain where it differs from sorted ids
    rev = weighted_estimate(values, chain, log_w, run_log_z, run_chain=np.array([5, 0]))  # Z_0 = 3, Z_5 = 1
    assert rev[0] == pytest.approx((3 * 2.5 + 1 * 4.5) / 4, rel=1e-14)
    with pytest.raises(ValueError):
        weighted_estimate(values, chain, log_w, run_log_z[:1])


# -- the file -----------------------------------------------------------------------------------


def test_writer_reader_runs(tmp_path):
    rng = np.random.default_rng(1)
    runs = [_importance_run(rng, c, n) for c, n in ((0, 5), (1, 7), (4, 6))]
    path = tmp_path / "w.h5"
    _write(path, runs)
    assert verify(path) == []
    lz = np.array([r[1]["annealing/log_z"][0] for r in runs])
    with EnsembleReader(path) as r:
        assert r.is_weighted and r.n_committed == 18 and r.n_runs_committed == 3
        got = r.runs()
        assert got["annealing/chain"].tolist() == [0, 1, 4] and got["annealing/n_particles"].tolist() == [5, 7, 6]
        assert got["annealing/log_z"].dtype == np.float64 and got["annealing/chain"].dtype == np.int64
        assert r.log_z == pytest.approx(combine_log_z(lz)[0], rel=1e-15)
        assert r.attrs["log_z"] == pytest.approx(combine_log_z(lz)[0], rel=1e-15)
        assert r.attrs["log_z_err"] == pytest.approx(combine_log_z(lz)[1], rel=1e-15)
        assert r.attrs["n_runs_committed"] == 3
    plain = tmp_path / "plain.h5"
    with EnsembleWriter.create(plain, _meta()) as w:
        w.append(runs[0][0])
        with pytest.raises(ValueError, match="not a weighted ensemble"):
            w.append(_importance_run(rng, 9, 3)[0], runs=_importance_run(rng, 9, 3)[1])
    with EnsembleReader(plain) as r:
        assert not r.is_weighted and r.runs() == {} and math.isnan(r.log_z)


def test_writer_refuses_inconsistent_runs(tmp_path):
    rng = np.random.default_rng(2)
    with EnsembleWriter.create(tmp_path / "w.h5", _meta()) as w:
        rows, per_run = _importance_run(rng, 3, 4)
        with pytest.raises(ValueError, match="n_particles"):
            w.append(rows, runs={**per_run, "annealing/n_particles": np.array([5])})
        with pytest.raises(ValueError, match="lack"):
            w.append(rows, runs={k: v for k, v in per_run.items() if k != "annealing/ess"})
        with pytest.raises(ValueError, match="does not match"):
            w.append(rows, runs={**per_run, "annealing/chain": np.array([2])})
        w.append(rows, runs=per_run)
        with pytest.raises(ValueError, match="every commit needs runs"):
            w.append(_importance_run(rng, 4, 4)[0])
        with pytest.raises(ValueError, match="exceed"):
            w.append(*_importance_run(rng, 3, 4)[:1], runs=_importance_run(rng, 3, 4)[1])
        assert w.n_committed == 4 and w.n_runs_committed == 1


@pytest.mark.parametrize("fail_at", ["sha256", "n_committed"])
def test_abandoned_commit_leaves_committed_runs_and_resume_truncates(tmp_path, monkeypatch, fail_at):
    """A commit abandoned after its rows (``sha256``) or after its checksums and run attributes (``n_committed``)."""
    rng = np.random.default_rng(3)
    runs = [_importance_run(rng, c, 6) for c in range(4)]
    path = tmp_path / "w.h5"
    w = EnsembleWriter.create(path, _meta())
    for i, (rows, per_run) in enumerate(runs[:2]):
        w.append(rows, f"state {i}".encode(), runs=per_run)
    real = writer_module._set_attr

    def failing(obj, name, value):
        if name == fail_at:
            raise OSError("killed")
        real(obj, name, value)

    monkeypatch.setattr(writer_module, "_set_attr", failing)
    with pytest.raises(OSError):
        w.append(runs[2][0], b"state 2", runs=runs[2][1])
    w.close()
    monkeypatch.setattr(writer_module, "_set_attr", real)
    with h5py.File(path, "r") as f:  # the abandoned run is in the file, beyond the committed ones
        assert f["annealing/log_z"].shape[0] == 3 and f["markov/chain"].shape[0] == 18
        assert f.attrs["n_runs_committed"] == (3 if fail_at == "n_committed" else 2)
    lz = np.array([r[1]["annealing/log_z"][0] for r in runs])
    assert verify(path) == []
    with EnsembleReader(path) as r:
        assert r.n_committed == 12 and r.n_runs_committed == 2
        assert r.runs()["annealing/chain"].tolist() == [0, 1]
        assert r.log_z == pytest.approx(combine_log_z(lz[:2])[0], rel=1e-15)
    w, state = EnsembleWriter.resume(path)
    assert state == b"state 1" and w.n_committed == 12 and w.n_runs_committed == 2
    with h5py.File(path, "r") as f:
        assert f["annealing/log_z"].shape[0] == 2 and f["markov/chain"].shape[0] == 12
        assert f.attrs["n_runs_committed"] == 2
        assert f.attrs["log_z"] == pytest.approx(combine_log_z(lz[:2])[0], rel=1e-15)
    w.append(runs[3][0], b"state 3", runs=runs[3][1])
    w.close()
    assert verify(path) == []
    with EnsembleReader(path) as r:
        assert r.runs()["annealing/chain"].tolist() == [0, 1, 3]
        assert r.attrs["log_z"] == pytest.approx(combine_log_z(lz[[0, 1, 3]])[0], rel=1e-15)


def test_verify_weighted_file(tmp_path, latflow_cli):
    rng = np.random.default_rng(4)
    good = tmp_path / "good.h5"
    _write(good, [_importance_run(rng, c, 5) for c in range(3)])
    assert verify(good) == []
    assert latflow_cli.run(["verify", "good.h5"], tmp_path).returncode == 0
    damages = {
        "log_z": lambda f: f["annealing/log_z"].__setitem__(1, 0.0),  # a per-run value changed: sha256
        "n_particles": lambda f: f["annealing/n_particles"].__setitem__(0, 4),  # runs no longer match the rows
        "runs": lambda f: f.attrs.modify("n_runs_committed", np.int64(2)),  # rows of a run without the run
        "missing": lambda f: f.__delitem__("annealing/ess"),
    }
    for name, damage in damages.items():
        bad = tmp_path / f"bad_{name}.h5"
        bad.write_bytes(good.read_bytes())
        with h5py.File(bad, "r+") as f:
            damage(f)
        assert verify(bad), name
    r = latflow_cli.run(["verify", "bad_n_particles.h5"], tmp_path)
    assert r.returncode != 0 and "annealing" in r.stdout + r.stderr


def test_resume_refuses_damaged_runs(tmp_path):
    from latflow.ensemble import EnsembleError

    rng = np.random.default_rng(5)
    path = tmp_path / "w.h5"
    _write(path, [_importance_run(rng, c, 5) for c in range(2)])
    with h5py.File(path, "r+") as f:
        f["annealing/log_z"][0] = 1.0
    with pytest.raises(EnsembleError, match="sha256"):
        EnsembleWriter.resume(path)


# -- weighted analysis --------------------------------------------------------------------------


def _exact_means() -> dict[str, float]:
    return {"x": MU, "x2": MU**2 + 1.0}


@pytest.mark.statistical
def test_analyze_weighted_runs_against_exact(tmp_path, record_z):
    rng = np.random.default_rng(stat_seed(9101))
    path = tmp_path / "w.h5"
    _write(path, [_importance_run(rng, c, 400) for c in range(20)])
    variance = {"variance": DerivedObservable(("x", "x2"), lambda m, m2: m2 - m**2)}
    res = analyze_ensemble(path, derived=variance, known_means=_exact_means(), exact_log_z=EXACT_LOG_Z)
    assert res["weighted"] and res["n_chains"] == 20 and res["runs"]["particles_per_run"] == [400] * 20
    for name in ("x", "x2"):
        entry = res["observables"][name]
        assert entry["method"] == "runs" and entry["n_runs"] == 20 and entry["n"] == 8000
        record_z(name, entry["z"])
        assert abs(entry["z"]) < 3, (name, entry)
    var = res["derived"]["variance"]
    z_var = (var["mean"] - 1.0) / var["err"]
    record_z("variance", z_var)
    assert var["method"] == "runs" and abs(z_var) < 3, var
    runs = res["runs"]
    assert runs["exact_log_z"] == EXACT_LOG_Z and runs["log_z_err"] > 0
    record_z("log_z", runs["log_z_z"])
    assert abs(runs["log_z_z"]) < 3, runs
    assert 0.3 < runs["ess_min"] <= runs["ess_mean"] <= 1.0
    assert not any("runs back" in w or "ESS fraction below" in w for w in res["warnings"])
    table = format_table(res)
    assert "log Z = " in table and "particles per run: 400" in table and " runs " in table


@pytest.mark.statistical
def test_analyze_single_run_ess_error(tmp_path, record_z):
    rng = np.random.default_rng(stat_seed(9102))
    path = tmp_path / "one.h5"
    _write(path, [_importance_run(rng, 0, 4000)])
    res = analyze_ensemble(path, known_means=_exact_means(), exact_log_z=EXACT_LOG_Z)
    for name in ("x", "x2"):
        entry = res["observables"][name]
        assert entry["method"] == "ess" and entry["n_runs"] == 1
        record_z(name, entry["z"])
        assert abs(entry["z"]) < 3, (name, entry)
    assert math.isnan(res["runs"]["log_z_err"]) and res["runs"]["log_z_z"] is None
    assert any("ignores the correlations between resampled particles" in w for w in res["warnings"])


def test_analyze_weighted_warnings(tmp_path):
    rng = np.random.default_rng(6)
    runs = [_importance_run(rng, c, 50) for c in range(3)]
    x = rng.normal(size=50)
    runs.append(_run(3, x, 40.0 * x))  # one particle carries the run: ESS fraction ~ 1/50, heavy pooled tail
    path = tmp_path / "w.h5"
    _write(path, runs, n_samples=6)  # runs asked for
    res = analyze_ensemble(path)
    text = "\n".join(res["warnings"])
    assert "ESS fraction below 0.1" in text and "only 4 runs back the jackknife errors" in text
    assert "4 of 6 runs committed" in text and not res["complete"]
    assert "Pareto k-hat" in text
    assert res["observables"]["x"]["method"] == "runs"
    assert "warning: final ESS fraction" in format_table(res)
