"""``latflow analyze A.h5 B.h5``: ensembles of one job combined as replicas, derived observables, error methods
and bad input, cross-checked against pyerrors on real HMC ensembles written by the package."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from latflow.analysis import analyze_ensembles
from latflow.ensemble import EnsembleMeta, EnsembleWriter
from latflow.jobs.analyze import builtin_derived, effective_mass

pe = pytest.importorskip("pyerrors")

OBSERVABLES = ("phi2", "action", "ising_energy", "abs_magnetization", "chi2")
# pyerrors, given the fluctuations about the common mean (``Obs(deltas, names, means=...)``), follows the same
# conventions as latflow.analysis.gamma: only rounding differs (FFT vs pyerrors' FFT, summation order)
RTOL_SAME_CONVENTION = 1e-8
# pyerrors' own replica handling subtracts each replica's mean (we subtract the common mean, Wolff sec. 3):
# that shifts every Gamma(t) by O(C_F / N_r), so C_F summed over 2W + 1 lags by O(R (2W + 1) / N) relative
# (R replicas, N samples); with 8 chains of 150 that is 8-20 % here (measured 8-15 %), and the window may
# move by a few lags. The plain comparison allows twice that.


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory, latflow_cli, make_job) -> Path:
    """Two HMC ensembles of the same job (phi^4, 4x4, 4 chains of 150) with different seeds."""
    d = tmp_path_factory.mktemp("multi")
    make_job(d, "hmc", {"sampler.n_samples": 150, "output.path": "a.h5", "run.seed": 11})
    for args in (["sample", "job.toml"], ["sample", "job.toml", "--set", "run.seed=12", "--out", "b.h5"]):
        r = latflow_cli.run(args, d)
        assert r.returncode == 0, r
    return d


def _chains(path: Path, name: str) -> list[np.ndarray]:
    """Each chain's series of observable ``name`` in Markov order, read with h5py alone."""
    with h5py.File(path, "r") as f:
        n = int(f.attrs["n_committed"])
        x, chain, step = f[f"observables/{name}"][:n], f["markov/chain"][:n], f["markov/step"][:n]
    out = []
    for c in np.unique(chain):
        idx = np.flatnonzero(chain == c)
        out.append(x[idx[np.argsort(step[idx], kind="stable")]])
    return out


def _pe_obs(reps: list[np.ndarray], common_mean: bool) -> object:
    names = [f"ens|r{i:02d}" for i in range(len(reps))]
    if not common_mean:
        return pe.Obs(reps, names)
    mean = np.concatenate(reps).mean()
    obs = pe.Obs([r - mean for r in reps], names, means=[mean] * len(reps))
    obs._value = mean  # given fluctuations and means, pyerrors leaves the value to its caller (as its own code does)
    return obs


def test_two_ensembles_are_replicas_like_pyerrors(ensembles) -> None:
    paths = [ensembles / "a.h5", ensembles / "b.h5"]
    res = analyze_ensembles(paths)
    assert res["files"][0]["path"] == str(paths[0]) and len(res["files"]) == 2
    assert res["n_chains"] == 8 and res["n_committed"] == 1200
    for name in OBSERVABLES:
        reps = _chains(paths[0], name) + _chains(paths[1], name)
        ours = res["observables"][name]
        same = _pe_obs(reps, common_mean=True)
        same.gamma_method(S=1.5)
        assert ours["mean"] == pytest.approx(same.value, rel=1e-10, abs=1e-14)
        assert ours["err"] == pytest.approx(same.dvalue, rel=RTOL_SAME_CONVENTION)
        assert ours["tau_int"] == pytest.approx(same.e_tauint["ens"], rel=RTOL_SAME_CONVENTION)
        plain = _pe_obs(reps, common_mean=False)
        plain.gamma_method(S=1.5)
        assert ours["mean"] == pytest.approx(plain.value, rel=1e-10)
        rtol = 2 * len(reps) * (2 * ours["window"] + 1) / ours["n"]
        assert ours["err"] == pytest.approx(plain.dvalue, rel=rtol)
        assert ours["tau_int"] == pytest.approx(plain.e_tauint["ens"], rel=2 * rtol)


def test_one_ensemble_is_analyze_ensemble(ensembles) -> None:
    """One file, Gamma method: the per-file analysis, number for number, also against pyerrors."""
    res = analyze_ensembles([ensembles / "a.h5"])
    reps = _chains(ensembles / "a.h5", "phi2")
    obs = _pe_obs(reps, common_mean=True)
    obs.gamma_method(S=1.5)
    assert res["observables"]["phi2"]["mean"] == pytest.approx(obs.value, rel=1e-10)
    assert res["observables"]["phi2"]["err"] == pytest.approx(obs.dvalue, rel=RTOL_SAME_CONVENTION)
    assert [f["path"] for f in res["files"]] == [str(ensembles / "a.h5")]


def test_cli_json_lists_files_and_derived_from_a_file(ensembles, latflow_cli) -> None:
    (ensembles / "my_obs.py").write_text(
        "DERIVED = {'chi_over_absm': (('chi2', 'abs_magnetization'), lambda c, m: c / m, 'chi2 / |M|')}\n",
        encoding="utf-8",
    )
    r = latflow_cli.run(["analyze", "a.h5", "b.h5", "--derived", "my_obs.py", "--json"], ensembles)
    assert r.returncode == 0, r
    out = json.loads(r.stdout)
    assert [f["path"] for f in out["ensemble"]["files"]] == ["a.h5", "b.h5"]
    assert out["ensemble"]["n_chains"] == 8
    got = out["chi_over_absm"]
    assert got["inputs"] == ["chi2", "abs_magnetization"] and got["description"] == "chi2 / |M|"
    # pyerrors' derived_observable (automatic differentiation) of the same replicas
    files = [ensembles / "a.h5", ensembles / "b.h5"]
    chi = _pe_obs(_chains(files[0], "chi2") + _chains(files[1], "chi2"), common_mean=True)
    absm = _pe_obs(_chains(files[0], "abs_magnetization") + _chains(files[1], "abs_magnetization"), True)
    ratio = pe.derived_observable(lambda x, **kw: x[0] / x[1], [chi, absm])
    ratio.gamma_method(S=1.5)
    assert got["mean"] == pytest.approx(ratio.value, rel=1e-10)
    # central differences (step 1 % of the naive error) against automatic differentiation: 1e-6
    assert got["err"] == pytest.approx(ratio.dvalue, rel=1e-6)
    assert "susceptibility" in out and "chi2_connected" in out  # built-in and the theory's own
    table = latflow_cli.run(["analyze", "a.h5", "b.h5", "--errors", "jackknife"], ensembles)
    assert table.returncode == 0, table
    assert "files (replicas of one analysis): a.h5 (600 rows, 4 chain(s)), b.h5 (600 rows, 4 chain(s))" in table.stdout
    assert "errors: jackknife" in table.stdout and "acceptance:" in table.stdout


def test_resampling_methods_in_the_analysis(ensembles) -> None:
    paths = [ensembles / "a.h5", ensembles / "b.h5"]
    gam = analyze_ensembles(paths)["observables"]["phi2"]
    for method in ("jackknife", "bootstrap", "binning"):
        res = analyze_ensembles(paths, errors=method, bin_size=10)
        entry = res["observables"]["phi2"]
        assert (entry["method"], entry["bin_size"], entry["n_bins"]) == (method, 10, 120)
        assert entry["mean"] == pytest.approx(gam["mean"], rel=1e-12)
        assert entry["tau_int"] == gam["tau_int"] and entry["window"] == gam["window"]
        # 120 bins: the error of an error is ~7 %; tau_int ~ 1, so bins of 10 are long enough
        assert entry["err"] == pytest.approx(gam["err"], rel=0.3)


def test_effective_masses_of_a_stored_correlator(tmp_path) -> None:
    """m_eff(t) from observables/corr (n, T): log and cosh forms, errors against pyerrors."""
    n_t, mass, n = 8, 0.4, 400
    rng = np.random.default_rng(5)
    t = np.arange(n_t)
    exact = np.cosh(mass * (n_t / 2 - t))
    corr = exact * (1 + 0.02 * rng.standard_normal((n, 1))) + 0.01 * rng.standard_normal((n, n_t))
    meta = EnsembleMeta(
        theory="phi4",
        couplings={"m2": 0.5, "lam": 0.0},
        lattice_shape=(n_t, 2),
        sampler={"kind": "hmc", "n_samples": n},
        seed=1,
    )
    path = tmp_path / "corr.h5"
    with EnsembleWriter.create(path, meta) as w:
        w.append(
            {
                "fields/phi": np.zeros((n, n_t, 2)),
                "markov/chain": np.zeros(n, np.int64),
                "markov/step": np.arange(n),
                "markov/accepted": np.ones(n, bool),
                "observables/corr": corr,
            }
        )
    derived = builtin_derived("phi4", 2 * n_t, {"corr": (n_t,)}, {"corr": "log"})
    res = analyze_ensembles([path], derived=derived)["derived"]
    c = [pe.Obs([corr[:, i]], ["ens"]) for i in range(n_t)]
    for i in range(n_t - 1):
        ref = (c[i] / c[i + 1]).log()
        ref.gamma_method(S=1.5)
        assert res[f"m_eff_corr[{i}]"]["mean"] == pytest.approx(ref.value, rel=1e-10)
        assert res[f"m_eff_corr[{i}]"]["err"] == pytest.approx(ref.dvalue, rel=1e-5)
    cosh = effective_mass(1, n_t, "cosh")
    assert cosh(exact[1], exact[2]) == pytest.approx(mass, rel=1e-10)
    assert effective_mass(1, n_t, "log")(exact[1], exact[2]) == pytest.approx(math.log(exact[1] / exact[2]))
    assert set(builtin_derived("phi4", 16, {"corr": (n_t,)}, {"corr": "cosh"})) == {
        f"m_eff_corr[{i}]" for i in range(3)
    }


@pytest.mark.parametrize(
    ("args", "files", "expect"),
    [
        (["a.h5", "--errors", "median"], {}, ("a.h5", "--errors 'median'", "gamma, jackknife, bootstrap, binning")),
        (["a.h5", "a.h5"], {}, ("a.h5", "given twice")),
        (["a.h5", "c.h5"], {}, ("c.h5", "'couplings'", "-3.9", "-4.0")),
        (["a.h5", "--derived", "bad.py"], {"bad.py": "DERIVED = {\n  'x': ((\n"}, ("bad.py", "--derived", "syntax")),
        (["a.h5", "--derived", "none.py"], {"none.py": "X = 1\n"}, ("none.py", "DERIVED", "'name'")),
        (
            ["a.h5", "--derived", "miss.py"],
            {"miss.py": "DERIVED = {'r': (('phi2', 'nope'), lambda a, b: a / b)}\n"},
            ("miss.py", "'nope'", "allowed:", "phi2"),
        ),
        (
            ["a.h5", "--derived", "arity.py"],
            {"arity.py": "DERIVED = {'r': (('phi2',), lambda a, b: a / b)}\n"},
            ("arity.py", "DERIVED['r']", "does not take 1 means"),
        ),
        (["a.h5", "--reweight", "beta=2"], {}, ("--reweight 'beta=2'", "m2, lam")),
        (["a.h5", "--effective-mass", "phi2"], {}, ("a.h5", "--effective-mass 'phi2'", "NAME[:log|cosh]")),
    ],
    ids=["errors", "twice", "mismatch", "syntax", "no-derived", "missing-input", "arity", "reweight-key", "meff"],
)
def test_bad_input_one_line(ensembles, latflow_cli, tmp_path, args, files, expect) -> None:
    for name in ("a.h5",):
        shutil.copy2(ensembles / name, tmp_path / name)
    shutil.copy2(ensembles / "a.h5", tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "r+") as f:
        f.attrs["couplings"] = json.dumps({"m2": -3.9, "lam": 6.975})
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    r = latflow_cli.run(["analyze", *args], tmp_path)
    assert r.returncode == 2, r
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latflow: error:"), r
    for e in expect:
        assert e in lines[0], (e, lines[0])
