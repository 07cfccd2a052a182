"""Diagnostics of the analysis on data with known answers (latflow.analysis.diagnostics), and the
warnings, known means and file checks of ``latflow analyze`` / ``latflow verify`` on real ensembles."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import stat_seed
from scipy.signal import lfilter

from latflow.analysis import analyze_ensemble, gamma_method, pareto_khat
from latflow.analysis.diagnostics import (
    KHAT_INFINITE_VARIANCE,
    MIN_CHAIN_TAU,
    accepted_warning,
    frozen_chains,
    khat_warning,
    series_warnings,
)


def ar1(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    """Stationary AR(1) chain ``x_t = a x_{t-1} + eps_t``, shape ``(n,)``; ``tau_int = (1+a) / (2(1-a))``."""
    eps = rng.standard_normal(n)
    eps[0] /= np.sqrt(1 - a**2)
    return lfilter([1.0], [1.0, -a], eps)


def warnings_of(reps: list[np.ndarray], known_mean: float | None = None) -> list[str]:
    res = gamma_method(reps, known_mean=known_mean)
    return series_warnings(res, [r.size for r in reps], frozen=frozen_chains(reps), known_mean=known_mean)


# --- window cap, short chains, frozen chains ---------------------------------------------------


@pytest.mark.statistical
def test_ar1_with_tau_int_far_above_the_chain_length_warns(record_z) -> None:
    """tau_int >> N: the error cannot be trusted, and the analysis says so."""
    rng = np.random.default_rng(stat_seed(801))
    # one chain of 200 steps with tau_int = 999.5 (its estimate is biased low, about N / 8, but stays
    # above N / 50: none of 3000 seeds tried fell below N / 40)
    w = warnings_of([ar1(rng, 200, 0.999)])
    assert any("the chain is shorter than 50 tau_int" in x for x in w), w
    # 16 chains of 300 steps with tau_int = 99.5 (the U(1) HMC tests' old shape): the window sums up
    # to half a chain and stops at its cap, since the total N keeps Wolff's criterion from stopping it
    reps = [ar1(rng, 300, 0.99) for _ in range(16)]
    res = gamma_method(reps)
    assert res.window_capped and res.window == 300 // 2 - 1
    w = warnings_of(reps)
    assert any("reached its cap W = 149" in x for x in w), w
    assert any("16 of 16 chains are shorter than 50 tau_int" in x for x in w), w
    # a control with tau_int = 1.5 on 20000 steps: no warning, and an honest error
    x = ar1(rng, 20_000, 0.5)
    res = gamma_method(x)
    z = res.mean / res.err
    record_z("ar1_control_mean", z)
    assert abs(z) < 3
    assert series_warnings(res, [x.size]) == []


def test_window_at_its_cap_warns() -> None:
    # chains stuck away from the known mean: rho(t) = 1 at every lag, and with 16 chains Wolff's
    # criterion does not stop the window before its cap
    stuck = [np.full(300, 2.0) + 1e-3 * np.sin(np.arange(300) + k) for k in range(16)]
    res = gamma_method(stuck, known_mean=0.0)
    assert res.window_capped and res.window == 300 // 2 - 1
    w = series_warnings(res, [300] * 16)
    assert any("reached its cap W = 149" in x and "lower bounds" in x for x in w), w
    # well-mixed chains of the same shape do not reach it
    rng = np.random.default_rng(4)
    res = gamma_method([ar1(rng, 300, 0.5) for _ in range(16)])
    assert not res.window_capped and series_warnings(res, [300] * 16) == []


def test_frozen_chain_warns() -> None:
    rng = np.random.default_rng(3)
    moving = [ar1(rng, 2000, 0.5), ar1(rng, 2000, 0.5)]
    assert warnings_of(moving) == []
    frozen = [*moving, np.full(2000, 1.0)]  # e.g. a topological charge that never tunnels
    w = warnings_of(frozen)
    assert any("never changes in 1 of 3 chain(s)" in x for x in w), w
    assert any("--mean" in x for x in w)  # the hint, since no exact mean was given
    assert frozen_chains(frozen) == 1
    # every chain frozen, at different values: flagged (the error alone would be finite and small)
    stuck = [np.full(500, -1.0), np.full(500, 0.0), np.full(500, 1.0)]
    w = warnings_of(stuck)
    assert any("never changes in 3 of 3 chain(s)" in x for x in w), w
    # ... and with the exact mean the error is honest and the window at its cap is flagged too
    w = warnings_of(stuck, known_mean=0.0)
    assert any("never changes" in x for x in w) and not any("--mean" in x for x in w)
    assert gamma_method(stuck, known_mean=0.0).err > 0.3


def test_accepted_proposals_warning() -> None:
    assert accepted_warning([120, 300], [1000, 1000]) is None
    w = accepted_warning([400, 8], [1000, 1000])
    assert w is not None and "chain 1 accepted 8 of 1000" in w and "at most 9 distinct" in w


# --- Pareto k-hat --------------------------------------------------------------------------------


@pytest.mark.statistical
@pytest.mark.parametrize(("alpha", "base"), [(1.5, 811), (5.0, 812)])
def test_pareto_khat_of_pareto_weights(alpha: float, base: int, record_z) -> None:
    """Weights with a Pareto tail of index alpha have k = 1/alpha: infinite variance for alpha < 2."""
    rng = np.random.default_rng(stat_seed(base))
    n = 100_000
    log_w = np.log1p(rng.pareto(alpha, n)) + 3.0  # Pareto(alpha) on [1, inf), any normalisation
    tail = pareto_khat(log_w)
    assert tail.n == n and tail.m_tail == int(np.ceil(3 * np.sqrt(n)))
    # asymptotic standard deviation of the GPD shape estimate: (1 + k) / sqrt(M)
    k = 1.0 / alpha
    z = (tail.khat - k) / ((1 + k) / np.sqrt(tail.m_tail))
    record_z(f"khat_alpha_{alpha:g}", z)
    assert abs(z) < 3
    warning = khat_warning(tail, "weights/proposal_log_w")
    if alpha < 2:
        assert warning is not None and "infinite variance" in warning, tail
    else:
        assert warning is None, tail
    # invariant under the normalisation of the weights
    assert pareto_khat(log_w - 1e4).khat == pytest.approx(tail.khat, rel=1e-9)


@pytest.mark.parametrize("shape", [-0.2, 0.1, 0.3, 0.7, 1.2])
def test_zhang_stephens_agrees_with_maximum_likelihood(shape: float) -> None:
    """The Zhang-Stephens estimate of the GPD shape against scipy's maximum-likelihood fit of the same
    exceedances: two estimators of one parameter, consistent to O(1/n) (here within 0.02 at n = 1000)."""
    from scipy.stats import genpareto

    from latflow.analysis.diagnostics import _gpd_shape_zhang_stephens

    for seed in range(5):
        x = np.sort(genpareto.rvs(shape, scale=2.0, size=1000, random_state=seed))
        mle, _, _ = genpareto.fit(x, floc=0)
        assert _gpd_shape_zhang_stephens(x) == pytest.approx(mle, abs=0.02)


def test_pareto_khat_edge_cases() -> None:
    assert pareto_khat(np.zeros(30)).khat is None  # too few weights
    assert pareto_khat(np.zeros(1000)).khat is None  # the largest weights tie: no tail to fit
    lw = np.random.default_rng(0).standard_normal(1000)
    lw[::7] = np.nan
    assert pareto_khat(lw).n == 1000 - len(range(0, 1000, 7))
    with pytest.raises(ValueError):
        pareto_khat(np.array([0.0, np.inf] * 50))
    assert KHAT_INFINITE_VARIANCE == 0.5


# --- known means reproduce pyerrors --------------------------------------------------------------


def test_known_mean_reproduces_pyerrors() -> None:
    """pyerrors takes fixed means as ``Obs(deltas, names, means=...)``; it always applies Wolff's bias
    correction (eq. 49), which is void when no mean is estimated, so the two differ by exactly
    ``c = 1 + (2W + 1)/N`` in ``C_F``: ``err = err_pe / sqrt(c)``, ``tau = tau_pe (1 + 1/N) / c``."""
    pe = pytest.importorskip("pyerrors")
    rng = np.random.default_rng(17)
    r1, r2 = ar1(rng, 6000, 0.9) + 0.2, ar1(rng, 2500, 0.9) - 0.1
    for mu in (0.0, 0.25):
        ours = gamma_method([r1, r2], known_mean=mu)
        obs = pe.Obs([r1 - mu, r2 - mu], ["ens|r1", "ens|r2"], means=[mu, mu])
        obs.gamma_method(S=1.5)
        n, w = r1.size + r2.size, obs.e_windowsize["ens"]
        c = 1 + (2 * w + 1) / n
        assert ours.window == w
        assert ours.err == pytest.approx(obs.dvalue / np.sqrt(c), rel=1e-10)
        assert ours.tau_int == pytest.approx(obs.e_tauint["ens"] * (1 + 1 / n) / c, rel=1e-10)
        assert ours.tau_int_err == pytest.approx(obs.e_dtauint["ens"], rel=1e-10)


# --- the CLI on real ensembles -------------------------------------------------------------------

GAMMA_KEYS = {"mean", "err", "tau_int", "tau_int_err", "n", "window", "window_capped", "known_mean", "warnings"}


@pytest.fixture(scope="module")
def hmc_ensemble(tmp_path_factory, latflow_cli, make_job):
    """A real phi^4 HMC ensemble (4 chains x 40 steps: too short for its tau_int, on purpose)."""
    d = tmp_path_factory.mktemp("hmc")
    make_job(d, "hmc", name="hmc.toml")
    r = latflow_cli.run(["sample", "hmc.toml"], d)
    assert r.returncode == 0, str(r)
    return d / "hmc.h5"


def _json(r) -> dict:
    assert r.returncode == 0, str(r)
    return json.loads(r.stdout)


def _one_line_error(r, code: int = 2) -> str:
    assert r.returncode == code, str(r)
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_cli_warnings_in_table_and_json(hmc_ensemble, latflow_cli, tmp_path) -> None:
    out = _json(latflow_cli.run(["analyze", "--json", str(hmc_ensemble)], tmp_path))
    names = [k for k in out if k not in ("acceptance", "ess", "ensemble")]
    assert "magnetization" in names and "chi2_connected" in names
    for name in names:
        assert GAMMA_KEYS <= set(out[name]), (name, out[name])
        assert isinstance(out[name]["warnings"], list)
    ens = out["ensemble"]
    assert ens["complete"] is True and ens["n_samples"] == 40 and ens["steps_per_chain"] == [40] * 4
    assert ens["checksums"] == "verified" and ens["warnings"] == []
    # 40 steps per chain cannot hold 50 tau_int of the magnetization (tau_int >= 1 here)
    mag = out["magnetization"]
    assert mag["tau_int"] * MIN_CHAIN_TAU > 40
    assert any("shorter than 50 tau_int" in w for w in mag["warnings"]), mag

    r = latflow_cli.run(["analyze", str(hmc_ensemble)], tmp_path)
    assert r.returncode == 0, str(r)
    assert "steps per chain: 40 of 40" in r.stdout
    assert "warning: magnetization: 4 of 4 chains are shorter than 50 tau_int" in r.stdout
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("magnetization "))
    assert row.rstrip().endswith("!")


def test_cli_mean_option(hmc_ensemble, latflow_cli, tmp_path) -> None:
    """--mean overrides the theory's exact mean (phi^4 declares <M> = 0) and reproduces gamma_method."""
    free = _json(latflow_cli.run(["analyze", "--json", str(hmc_ensemble)], tmp_path))
    out = _json(latflow_cli.run(["analyze", "--json", "--mean", "magnetization=0.05", str(hmc_ensemble)], tmp_path))
    assert out["magnetization"]["known_mean"] == 0.05 and free["magnetization"]["known_mean"] == 0.0
    assert out["ensemble"]["known_means"] == {"magnetization": 0.05}
    assert free["abs_magnetization"]["known_mean"] is None
    assert out["magnetization"]["mean"] == free["magnetization"]["mean"]  # still the sample mean
    with h5py.File(hmc_ensemble, "r") as f:
        chain, step = f["markov/chain"][:], f["markov/step"][:]
        m = f["observables/magnetization"][:]
    reps = [m[chain == c][np.argsort(step[chain == c])] for c in np.unique(chain)]
    ref = gamma_method(reps, known_mean=0.05)
    assert out["magnetization"]["err"] == pytest.approx(ref.err, rel=1e-12)
    assert out["magnetization"]["tau_int"] == pytest.approx(ref.tau_int, rel=1e-12)
    assert out["phi2"] == free["phi2"]  # the others are untouched

    line = _one_line_error(latflow_cli.run(["analyze", "--mean", "magnetisation=0", str(hmc_ensemble)], tmp_path))
    assert "magnetisation" in line and "allowed:" in line and "magnetization" in line and "phi2" in line
    line = _one_line_error(latflow_cli.run(["analyze", "--mean", "magnetization=zero", str(hmc_ensemble)], tmp_path))
    assert "NAME=VALUE" in line


def test_theory_exact_means_are_used(tmp_path, latflow_cli, make_job) -> None:
    """U(1) in 2D declares <Q> = 0 and <Re P> = 0; --mean overrides."""
    make_job(
        tmp_path,
        "hmc",
        {"theory": {"name": "u1", "beta": 2.0}, "sampler.n_samples": 20, "sampler.n_chains": 2},
        name="u1.toml",
    )
    assert latflow_cli.run(["sample", "u1.toml", "--out", "u1.h5"], tmp_path).returncode == 0
    out = _json(latflow_cli.run(["analyze", "--json", "u1.h5"], tmp_path))
    assert out["ensemble"]["known_means"] == {"polyakov_loop": 0.0, "topological_charge": 0.0}
    assert out["topological_charge"]["known_mean"] == 0.0 and out["plaquette"]["known_mean"] is None
    out = _json(latflow_cli.run(["analyze", "--json", "--mean", "topological_charge=0.5", "u1.h5"], tmp_path))
    assert out["topological_charge"]["known_mean"] == 0.5


def test_cli_truncated_file(hmc_ensemble, latflow_cli, tmp_path) -> None:
    data = hmc_ensemble.read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    for cmd, code in (("analyze", 2), ("verify", 1)):
        r = latflow_cli.run([cmd, "cut.h5"], tmp_path)
        assert r.returncode == code, str(r)
        text = r.stdout + r.stderr
        assert "Traceback" not in text and "another process" not in text and "lock" not in text
        assert "truncated" in text and "cut.h5" in text
        assert len(text.strip().splitlines()) == 1, text
    assert r.stdout.startswith("DAMAGED cut.h5")


def test_cli_damaged_group_index(hmc_ensemble, latflow_cli, tmp_path) -> None:
    """A damaged group index hides the datasets under it: verify and analyze must not read that as an
    ensemble without fields (it used to verify OK with "sha256 verified for no fields")."""
    data = bytearray(hmc_ensemble.read_bytes())
    i = data.find(b"SNOD")  # signature of an HDF5 symbol-table node (a group's index)
    assert i > 0
    data[i : i + 4] = b"XXXX"
    (tmp_path / "idx.h5").write_bytes(bytes(data))
    r = latflow_cli.run(["verify", "idx.h5"], tmp_path)
    assert r.returncode == 1 and r.stdout.startswith("DAMAGED idx.h5"), str(r)
    line = _one_line_error(latflow_cli.run(["analyze", "idx.h5"], tmp_path))
    assert "idx.h5" in line and "damaged" in line


def test_cli_checksum_mismatch(hmc_ensemble, latflow_cli, tmp_path) -> None:
    """analyze refuses a file whose fields do not match their sha256 unless told to go on."""
    shutil.copy2(hmc_ensemble, tmp_path / "bad.h5")
    with h5py.File(tmp_path / "bad.h5", "r+") as f:
        f["fields/phi"][7, 0, 0] += 1.0
    line = _one_line_error(latflow_cli.run(["analyze", "bad.h5"], tmp_path))
    assert "fields/phi" in line and "sha256" in line and "--ignore-checksums" in line
    out = _json(latflow_cli.run(["analyze", "--json", "--ignore-checksums", "bad.h5"], tmp_path))
    assert out["ensemble"]["checksums"] == "mismatch"
    assert any("DAMAGED" in w and "fields/phi" in w for w in out["ensemble"]["warnings"])
    assert any("DAMAGED" in w for w in out["phi2"]["warnings"])
    r = latflow_cli.run(["analyze", "--ignore-checksums", "bad.h5"], tmp_path)
    assert r.returncode == 0 and "warning: DAMAGED" in r.stdout, str(r)


def test_cli_incomplete_ensemble(latflow_cli, make_job, tmp_path) -> None:
    """A run killed after some commits: verify says INCOMPLETE (exit 0), analyze warns."""
    make_job(
        tmp_path,
        "hmc",
        {"sampler.n_samples": 200_000, "sampler.commit_every": 10, "sampler.log_every": 10},
        name="long.toml",
    )
    p = latflow_cli.spawn(["sample", "long.toml", "--out", "long.h5"], tmp_path)
    deadline = time.monotonic() + 120
    while "sample 20/" not in p.stderr_so_far():  # two commits are on disk
        assert p.running() and time.monotonic() < deadline, p.stderr_so_far()
        time.sleep(0.05)
    p.kill()  # SIGKILL: what a crash or an exceeded time limit does
    p.wait()
    r = latflow_cli.run(["verify", "long.h5"], tmp_path)
    assert r.returncode == 0, str(r)
    assert r.stdout.startswith("INCOMPLETE long.h5:") and "of 200000 steps per chain" in r.stdout, r.stdout
    out = _json(latflow_cli.run(["analyze", "--json", "long.h5"], tmp_path))
    ens = out["ensemble"]
    assert ens["complete"] is False and ens["n_samples"] == 200_000
    assert len(set(ens["steps_per_chain"])) == 1 and 20 <= ens["steps_per_chain"][0] < 200_000
    assert any("incomplete ensemble" in w and "of 200000 steps" in w for w in ens["warnings"]), ens
    assert any("incomplete ensemble" in w for w in out["magnetization"]["warnings"])
    r = latflow_cli.run(["analyze", "long.h5"], tmp_path)
    assert "(INCOMPLETE)" in r.stdout and "warning: incomplete ensemble" in r.stdout, str(r)


def test_flow_chain_with_few_accepted_proposals_warns(tmp_path, latflow_cli, make_job) -> None:
    """A barely trained flow: flow-MCMC accepts a handful of proposals and the weights are heavy-tailed."""
    make_job(tmp_path, "flow", {"train.steps": 2})
    assert latflow_cli.run(["run", "job.toml"], tmp_path).returncode == 0
    out = _json(latflow_cli.run(["analyze", "--json", "ens.h5"], tmp_path))
    ens = out["ensemble"]
    acc = ens["accepted_proposals"]
    assert acc["total"] == acc["per_chain"][0] < 50
    assert any("few accepted proposals" in w for w in ens["warnings"]), ens
    khat = ens["pareto_khat"]["weights/proposal_log_w"]["khat"]
    assert khat > 0.7 and any("Pareto k-hat" in w for w in out["magnetization"]["warnings"])


def test_analyze_ensemble_api_refuses_unknown_means(hmc_ensemble: Path) -> None:
    from latflow.analysis import AnalysisInputError

    with pytest.raises(AnalysisInputError, match="allowed: abs_magnetization"):
        analyze_ensemble(hmc_ensemble, known_means={"nope": 0.0})


def test_configurations_stored_every_few_steps(latflow_cli, make_job, tmp_path) -> None:
    """With output.save_every the observables have a row per step and the fields one per save: the
    analysis counts steps, and verify checks the stored configurations."""
    make_job(tmp_path, "hmc", {"output.save_every": 4, "sampler.n_samples": 20}, name="sparse.toml")
    assert latflow_cli.run(["sample", "sparse.toml"], tmp_path).returncode == 0
    r = latflow_cli.run(["verify", "hmc.h5"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("OK hmc.h5: 20 of 20 steps per chain"), str(r)
    out = _json(latflow_cli.run(["analyze", "--json", "hmc.h5"], tmp_path))
    assert out["ensemble"]["complete"] is True and out["ensemble"]["steps_per_chain"] == [20] * 4
    assert out["ensemble"]["checksums"] == "verified" and out["phi2"]["n"] == 80


# --- the exact means the theories declare are symmetries of their actions -----------------------


@pytest.mark.parametrize(
    ("theory", "couplings", "shape", "means"),
    [
        ("u1", {"beta": 2.0}, (6, 4), {"polyakov_loop": 0.0, "topological_charge": 0.0}),
        ("u1", {"beta": 2.0}, (4, 3, 3), {"polyakov_loop": 0.0}),
        ("schwinger", {"beta": 2.0, "kappa": 0.2}, (4, 4), {"topological_charge": 0.0}),
        ("phi4", {"m2": -4.0, "lam": 6.975}, (4, 4), {"magnetization": 0.0}),
    ],
)
def test_declared_exact_means_follow_from_symmetries(theory, couplings, shape, means) -> None:
    """theta -> -theta leaves the action (with the fermion determinant) invariant and flips Q; the
    centre transformation (links of one time slice times e^{i alpha}) leaves the pure-gauge action
    invariant and rotates the Polyakov loop: both means vanish exactly, as the theories declare."""
    import torch

    from latflow.jobs.runner import exact_means_for
    from latflow.lattice import Lattice
    from latflow.theories import get_spec

    assert exact_means_for(theory, couplings, shape) == means
    spec = get_spec(theory)
    model = spec.build(spec.params(**couplings), Lattice(shape))
    gen = torch.Generator().manual_seed(5)
    if theory == "phi4":  # phi -> -phi leaves the action invariant and flips M
        phi = torch.randn((3, *shape), generator=gen, dtype=torch.float64)
        torch.testing.assert_close(model.action(-phi), model.action(phi), rtol=1e-12, atol=1e-12)
        m, m_flip = model.observables(phi)["magnetization"], model.observables(-phi)["magnetization"]
        torch.testing.assert_close(m_flip, -m, rtol=0, atol=1e-12)
        assert m.abs().max() > 1e-3
        return
    theta = (2 * torch.rand((3, len(shape), *shape), generator=gen, dtype=torch.float64) - 1) * np.pi
    torch.testing.assert_close(model.action(-theta), model.action(theta), rtol=1e-10, atol=1e-9)
    if "topological_charge" in means:
        q, q_flip = model.observables(theta)["topological_charge"], model.observables(-theta)["topological_charge"]
        torch.testing.assert_close(q_flip, -q, rtol=0, atol=1e-9)
        assert q.abs().max() > 0.5  # not vacuous: some configuration has Q != 0
    if "polyakov_loop" in means:
        alpha = 0.7
        rotated = theta.clone()
        rotated[:, 0, 0] = rotated[:, 0, 0] + alpha  # every time-direction link leaving the slice x0 = 0
        torch.testing.assert_close(model.action(rotated), model.action(theta), rtol=1e-10, atol=1e-9)
        from latflow.gauge import u1_polyakov_loop

        p, p_rot = u1_polyakov_loop(theta), u1_polyakov_loop(rotated)
        torch.testing.assert_close(p_rot, p * np.exp(1j * alpha), rtol=1e-10, atol=1e-10)
