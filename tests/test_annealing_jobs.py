"""Annealing samplers selected from job files, run through the real ``latflow`` command line: weighted
ensembles against exact values, PIMH chains, CRAFT and SNF training, resumption bit for bit, and bad input."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.jobs import cli
from latflow.jobs.config import JobError, load_job

U1_SMC = """
[theory]
name = "u1"
beta = 2.0
[lattice]
shape = [4, 4]
[sampler]
kind = "{kind}"
n_samples = 12
commit_every = 6
n_particles = 64
path = "coupling"
coupling = "beta"
n_transitions = 20
schedule_power = 2.0
step_size = 0.3
n_steps = 4
[output]
path = "ens.h5"
[run]
seed = {seed}
"""

PHI4_CRAFT = """
[theory]
name = "phi4"
m2 = -4.0
lam = 6.975
[lattice]
shape = [4, 4]
[model]
kind = "affine"
n_layers = 2
hidden = [4]
[train]
checkpoint_every = 2
[sampler]
kind = "craft"
n_samples = {runs}
commit_every = 2
n_particles = 32
n_transitions = 3
step_size = [0.3, 0.15, 0.1]
n_steps = 5
integrator = "leapfrog"
n_iterations = {iterations}
lr = 0.003
[output]
path = "craft.h5"
[run]
seed = 11
"""


def _analyze(capsys, path: str) -> dict:
    capsys.readouterr()
    assert cli.main(["analyze", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.statistical
@pytest.mark.parametrize("kind", ["smc", "ais"])
def test_u1_anneal_in_beta_gives_the_exact_log_z_and_plaquette(tmp_path, monkeypatch, capsys, kind):
    """SMC and AIS from uniform links (beta = 0) to beta = 2 on the 4x4 torus: log Z (Haar probability measure)
    and the plaquette against the exact character-expansion values, errors from the spread over 16 runs."""
    from latflow.theories.u1 import exact_log_z, exact_plaquette

    monkeypatch.chdir(tmp_path)
    # 50 transitions keep AIS's weights tame (ESS ~0.6; at 20 the Z-weighted jackknife over 12 runs is unstable)
    job = U1_SMC.format(kind=kind, seed=stat_seed(71)).replace("n_transitions = 20", "n_transitions = 50")
    job = job.replace("n_samples = 12", "n_samples = 16").replace("commit_every = 6", "commit_every = 8")
    (tmp_path / "job.toml").write_text(job, encoding="utf-8")
    assert cli.main(["run", "job.toml"]) == 0
    result = _analyze(capsys, "ens.h5")
    runs = result["ensemble"]["runs"]
    assert runs["n_runs"] == 16 and set(runs["particles_per_run"]) == {64}
    z_logz = (runs["log_z"] - exact_log_z(2.0, (4, 4))) / runs["log_z_err"]
    assert abs(z_logz) < 3, runs
    r = result["plaquette"]
    z = (r["mean"] - exact_plaquette(2.0, (4, 4))) / r["err"]
    assert abs(z) < 3, r
    with h5py.File(tmp_path / "ens.h5", "r") as f:
        assert json.loads(f.attrs["sampler"])["kind"] == kind
        assert f["annealing/log_z"].shape == (16,)
        chains = f["markov/chain"][:]
        assert np.array_equal(np.unique(chains), np.arange(16))
        lw = f["weights/log_w"][:].reshape(16, 64)
        # final weights are normalised within each run
        np.testing.assert_allclose(np.logaddexp.reduce(lw, axis=1), 0.0, atol=1e-9)
    assert cli.main(["verify", "ens.h5"]) == 0


@pytest.mark.statistical
def test_pimh_chain_matches_the_exact_plaquette(tmp_path, monkeypatch, capsys):
    from latflow.theories.u1 import exact_plaquette

    monkeypatch.chdir(tmp_path)
    job = U1_SMC.format(kind="pimh", seed=stat_seed(72)).replace("n_samples = 12", "n_samples = 80")
    job = job.replace("commit_every = 6", "commit_every = 40\nn_chains = 8")
    job = job.replace("n_particles = 64", "n_particles = 16").replace("n_transitions = 20", "n_transitions = 8")
    (tmp_path / "job.toml").write_text(job, encoding="utf-8")
    assert cli.main(["run", "job.toml"]) == 0
    result = _analyze(capsys, "ens.h5")
    r = result["plaquette"]
    z = (r["mean"] - exact_plaquette(2.0, (4, 4))) / r["err"]
    assert abs(z) < 3, r
    with h5py.File(tmp_path / "ens.h5", "r") as f:
        acc = f["markov/accepted"][:]
        assert 0.1 < acc.mean() <= 1.0
        assert f["markov/chain"].shape == (640,)


def test_craft_training_and_sampling_resume_bit_for_bit(tmp_path, monkeypatch, capsys):
    """Training 3 + 3 iterations with --resume equals 6 at once; 2 + 2 runs with --resume equal 4 at once."""
    monkeypatch.chdir(tmp_path)
    for name, iterations, runs in (("a", 6, 4), ("b", 3, 2)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "job.toml").write_text(PHI4_CRAFT.format(iterations=iterations, runs=runs), "utf-8")
    monkeypatch.chdir(tmp_path / "a")
    assert cli.main(["run", "job.toml"]) == 0
    monkeypatch.chdir(tmp_path / "b")
    assert cli.main(["run", "job.toml"]) == 0
    more = ["--set", "sampler.n_iterations=6"]
    assert cli.main(["train", "job.toml", "--resume", *more]) == 0
    a = torch.load(tmp_path / "a" / "craft.model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "craft.model.pt", weights_only=True)
    assert a["step"] == b["step"] == 6 and a["complete"] and b["complete"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"]["log_z"] == b["history"]["log_z"]
    # sampling: the trained flows are the same, so 2 + 2 resumed runs equal 4 runs
    assert cli.main(["sample", "job.toml", "--force", *more]) == 0
    assert cli.main(["sample", "job.toml", "--resume", *more, "--set", "sampler.n_samples=4"]) == 0
    with h5py.File(tmp_path / "a" / "craft.h5", "r") as fa, h5py.File(tmp_path / "b" / "craft.h5", "r") as fb:
        assert fa.attrs["model_sha256"] == fb.attrs["model_sha256"] != ""
        for key in ("fields/phi", "weights/log_w", "annealing/log_z", "markov/chain"):
            np.testing.assert_array_equal(fa[key][:], fb[key][:], err_msg=key)
        assert fa.attrs["log_z"] == fb.attrs["log_z"]
    result = _analyze(capsys, str(tmp_path / "a" / "craft.h5"))
    assert result["ensemble"]["runs"]["n_runs"] == 4 and math.isfinite(result["ensemble"]["runs"]["log_z"])


@pytest.mark.statistical
def test_snf_job_gives_the_free_field_log_z(tmp_path, monkeypatch, capsys):
    from latflow.theories.phi4 import free_chi2, free_log_z

    monkeypatch.chdir(tmp_path)
    job = f"""
[theory]
name = "phi4"
m2 = 1.0
lam = 0.0
[lattice]
shape = [4, 4]
[model]
kind = "affine"
n_layers = 2
hidden = [4]
[train]
steps = 20
batch_size = 64
lr = 0.003
[sampler]
kind = "snf"
n_samples = 12
commit_every = 6
n_particles = 128
n_transitions = 4
kernel = "langevin"
step_size = 0.02
n_steps = 2
[output]
path = "snf.h5"
[run]
seed = {stat_seed(73)}
"""
    (tmp_path / "job.toml").write_text(job, encoding="utf-8")
    assert cli.main(["run", "job.toml"]) == 0
    result = _analyze(capsys, "snf.h5")
    runs = result["ensemble"]["runs"]
    assert abs(runs["log_z"] - free_log_z((4, 4), 1.0)) / runs["log_z_err"] < 3, runs
    r = result["chi2"]
    assert abs(r["mean"] - free_chi2((4, 4), 1.0)) / r["err"] < 3, r


@pytest.mark.statistical
def test_schwinger_anneal_in_kappa_from_the_pure_gauge_theory(tmp_path, monkeypatch, capsys):
    """SMC in kappa from the exactly sampled pure gauge theory (kappa = 0) to kappa = 0.2 on a 4x4 torus with the
    exact effective action: log Z(kappa) - log Z(0) against a direct importance estimate from exact pure-gauge
    draws, log E_0[det(D^dag D)] (both with errors)."""
    from latflow.jobs.runner import build_theory
    from latflow.theories.u1 import exact_log_z

    monkeypatch.chdir(tmp_path)
    job = U1_SMC.format(kind="smc", seed=stat_seed(74))
    job = job.replace('name = "u1"\nbeta = 2.0', 'name = "schwinger"\nbeta = 2.0\nkappa = 0.2')
    job = job.replace('coupling = "beta"', 'coupling = "kappa"').replace("n_transitions = 20", "n_transitions = 5")
    job = job.replace("n_samples = 12", "n_samples = 16").replace("commit_every = 6", "commit_every = 16")
    job = job.replace("n_particles = 64", "n_particles = 32")
    (tmp_path / "job.toml").write_text(job, encoding="utf-8")
    assert cli.main(["run", "job.toml"]) == 0
    result = _analyze(capsys, "ens.h5")
    anneal = result["ensemble"]["runs"]["log_z"] - exact_log_z(2.0, (4, 4))
    # direct: exact pure-gauge draws reweighted by det(D^dag D) = exp(-S_eff + S_gauge)
    theory = build_theory(load_job(tmp_path / "job.toml"))
    g = torch.Generator().manual_seed(stat_seed(75))
    x = theory.gauge.sample_exact(8000, g)
    with torch.no_grad():
        log_det = (theory.gauge.action(x) - theory.action(x)).double().numpy()
    top = log_det.max()
    w = np.exp(log_det - top)
    direct = top + math.log(w.mean())
    direct_err = w.std(ddof=1) / (math.sqrt(len(w)) * w.mean())
    err = math.hypot(result["ensemble"]["runs"]["log_z_err"], direct_err)
    assert abs(anneal - direct) / err < 3, (anneal, direct, result["ensemble"]["runs"]["log_z_err"], direct_err)


def _job(tmp_path, sampler: str, theory: str = 'name = "u1"\nbeta = 2.0') -> str:
    p = tmp_path / "job.toml"
    p.write_text(f'[theory]\n{theory}\n[lattice]\nshape = [4, 4]\n[sampler]\n{sampler}\n[output]\npath = "e.h5"\n')
    return str(p)


@pytest.mark.parametrize(
    ("sampler", "message"),
    [
        ('kind = "smc"\nthermalization = 5', r"'sampler.thermalization' = 5: must be 0"),
        ('kind = "smc"\nbatch_size = 5', r"'sampler.batch_size' = 5 is for sampler.kind"),
        ('kind = "craft"\nschedule = "adaptive"', r"'sampler.schedule' = 'adaptive': must be 'power'"),
        ('kind = "smc"\nresample_threshold = 1.5', r"'sampler.resample_threshold' = 1.5: must be a number in"),
        ('kind = "ais"\nresample_threshold = 0.5', r"'sampler.resample_threshold' = 0.5 is for sampler.kind"),
        ('kind = "smc"\nstep_size = [0.1, -0.2]', r"'sampler.step_size' = \[0.1, -0.2\]: must be a positive number"),
    ],
)
def test_bad_annealing_settings_are_one_line_errors(tmp_path, sampler, message):
    with pytest.raises(JobError, match=message) as info:
        load_job(_job(tmp_path, sampler))
    assert "\n" not in str(info.value)


def test_coupling_path_needs_an_exact_start(tmp_path, monkeypatch, capsys):
    """SU(3) in 4D has no exact sampler at beta = 1: the run stops with one line naming the key, writing nothing."""
    monkeypatch.chdir(tmp_path)
    path = _job(
        tmp_path,
        'kind = "smc"\npath = "coupling"\ncoupling_start = 1.0\nn_transitions = 2\nn_samples = 2',
        'name = "su3"\nbeta = 2.0',
    )
    text = (tmp_path / "job.toml").read_text().replace("shape = [4, 4]", "shape = [2, 2, 2, 2]")
    (tmp_path / "job.toml").write_text(text)
    assert cli.main(["run", path]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'sampler.path' = 'coupling' needs an exactly solvable start" in err[0], err
    assert not (tmp_path / "e.h5").exists()
    bad = text.replace("coupling_start = 1.0", 'coupling = "gamma"')
    (tmp_path / "job.toml").write_text(bad)
    assert cli.main(["run", path]) != 0
    assert "'sampler.coupling' = 'gamma': theory 'su3' has couplings" in capsys.readouterr().err
