"""Every example job validates, and the U(1) HMC example runs end to end against the exact torus values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from latflow.jobs import cli
from latflow.jobs.config import load_job

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "jobs" / "examples").glob("*.toml"))


def test_examples_exist_and_are_named_after_their_theory():
    assert EXAMPLES, "no example jobs"
    for path in EXAMPLES:
        job = load_job(path)
        assert path.name.startswith(job.theory.name + "_"), path.name


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_validates(path: Path):
    job = load_job(path)
    assert job.sampler.n_samples > 0 and job.output.path


def test_u1_example_runs_and_matches_the_exact_plaquette(tmp_path, monkeypatch, capsys):
    from latflow.theories.u1 import exact_plaquette, exact_q2

    example = next(p for p in EXAMPLES if p.name == "u1_hmc.toml")
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["run", str(example), "--set", "sampler.n_samples=200", "--set", "sampler.n_chains=32"])
    assert rc == 0
    capsys.readouterr()
    assert cli.main(["analyze", "u1_hmc.h5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    job = load_job(example)
    beta, shape = job.theory.couplings.beta, job.lattice.shape
    for name, exact in (("plaquette", exact_plaquette(beta, shape)), ("topological_charge_sq", exact_q2(beta, shape))):
        r = result[name]
        z = (r["mean"] - exact) / r["err"]
        assert abs(z) < 3, (name, r, exact, z)


U1_FLOW_JOB = """
[theory]
name = "u1"
beta = 1.0
[lattice]
shape = [4, 4]
[model]
kind = "u1-equivariant"
n_layers = 8
hidden = [8]
[train]
steps = 100
batch_size = 64
lr = 0.003
[sampler]
kind = "flow-mcmc"
n_samples = 4000
batch_size = 500
commit_every = 1000
[output]
path = "u1flow.h5"
[run]
seed = 3
"""


def test_u1_equivariant_flow_job_reproduces_the_exact_torus_values(tmp_path, monkeypatch, capsys):
    """A gauge-equivariant flow selected from a job file: flow-MCMC against the exact 4x4 torus."""
    from latflow.theories.u1 import exact_plaquette, exact_q2

    monkeypatch.chdir(tmp_path)
    (tmp_path / "job.toml").write_text(U1_FLOW_JOB, encoding="utf-8")
    assert cli.main(["run", "job.toml"]) == 0
    capsys.readouterr()
    assert cli.main(["analyze", "u1flow.h5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.2 < result["acceptance"]["mean"] < 1.0
    for name, exact in (("plaquette", exact_plaquette(1.0, (4, 4))), ("topological_charge_sq", exact_q2(1.0, (4, 4)))):
        r = result[name]
        z = (r["mean"] - exact) / r["err"]
        assert abs(z) < 3, (name, r, exact, z)
    # power: the plaquette of a 10% larger beta is excluded
    r = result["plaquette"]
    assert abs((r["mean"] - exact_plaquette(1.1, (4, 4))) / r["err"]) > 3, r


@pytest.mark.statistical
def test_u1_topology_example_with_the_plaquette_prior(tmp_path, monkeypatch, capsys):
    """The plaquette-prior example at beta = 6, shrunk to 8x8: the prior alone (n_layers = 0, nothing to train,
    so ``train`` writes a weightless checkpoint that ``sample`` reads) and the prior with briefly trained
    couplings both reproduce the exact plaquette and <Q^2>, from the command line."""
    from conftest import stat_seed

    from latflow.theories.u1 import exact_plaquette, exact_q2

    example = next(p for p in EXAMPLES if p.name == "u1_topology_flow.toml")
    monkeypatch.chdir(tmp_path)
    small = ["--set", "lattice.shape=[8, 8]", "--set", "sampler.n_samples=4000", "--set", "sampler.commit_every=2000"]
    seed = ["--set", f"run.seed={stat_seed(616)}"]
    alone = [*small, *seed, "--set", "model.n_layers=0", "--out", "alone.h5"]
    assert cli.main(["train", str(example), *alone]) == 0
    assert cli.main(["sample", str(example), *alone]) == 0
    flow = [*small, *seed, "--set", "train.steps=10", "--set", "model.n_layers=4", "--out", "flow.h5"]
    assert cli.main(["run", str(example), *flow]) == 0
    exact = {"plaquette": exact_plaquette(6.0, (8, 8)), "topological_charge_sq": exact_q2(6.0, (8, 8))}
    for name in ("alone.h5", "flow.h5"):
        capsys.readouterr()
        assert cli.main(["analyze", name, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["acceptance"]["mean"] > 0.3, result["acceptance"]
        for obs, value in exact.items():
            r = result[obs]
            assert not r["warnings"], r
            assert abs((r["mean"] - value) / r["err"]) < 3, (name, obs, r, value)


def test_schwinger_pf_hmc_example_runs_and_resumes(tmp_path, monkeypatch, capsys):
    """The pseudofermion HMC example, shrunk to 4x4: runs from the command line, resumes bit for bit."""
    import h5py
    import numpy as np

    example = next(p for p in EXAMPLES if p.name == "schwinger_pf_hmc.toml")
    monkeypatch.chdir(tmp_path)
    small = [
        "--set",
        "lattice.shape=[4, 4]",
        "--set",
        "sampler.n_chains=4",
        "--set",
        "sampler.n_tune=10",
        "--set",
        "sampler.thermalization=5",
        "--set",
        "sampler.commit_every=10",
    ]
    assert cli.main(["run", str(example), *small, "--set", "sampler.n_samples=20", "--out", "a.h5"]) == 0
    assert cli.main(["run", str(example), *small, "--set", "sampler.n_samples=10", "--out", "b.h5"]) == 0
    assert cli.main(["sample", str(example), *small, "--set", "sampler.n_samples=20", "--out", "b.h5", "--resume"]) == 0
    capsys.readouterr()
    with h5py.File("a.h5", "r") as a, h5py.File("b.h5", "r") as b:
        assert a.attrs["theory"] == "schwinger"
        assert np.array_equal(a["fields/links"][:], b["fields/links"][:])
        assert np.array_equal(a["observables/chiral_condensate"][:], b["observables/chiral_condensate"][:])
        sampler = json.loads(a.attrs["sampler"])
        assert sampler["kind"] == "pf-hmc" and sampler["even_odd"] is True and sampler["hasenbusch_kappas"] == [0.15]
    assert cli.main(["analyze", "a.h5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acceptance"]["mean"] > 0.7
    assert {"plaquette", "chiral_condensate", "topological_charge_sq", "fermion_logdet"} <= set(result)


def test_schwinger_pf_flow_example_trains_samples_and_resumes(tmp_path, monkeypatch, capsys):
    """The joint (links, pseudofermion) flow-MCMC from a job file: the flow is trained on the gauge
    action, sampling needs no determinant, and an interrupted run resumes bit for bit."""
    import h5py
    import numpy as np

    example = next(p for p in EXAMPLES if p.name == "schwinger_pf_flow.toml")
    monkeypatch.chdir(tmp_path)
    small = ["--set", "train.steps=40", "--set", "sampler.commit_every=500", "--set", "sampler.batch_size=250"]
    assert cli.main(["run", str(example), *small, "--set", "sampler.n_samples=1500", "--out", "a.h5"]) == 0
    assert (
        cli.main(
            [
                "sample",
                str(example),
                *small,
                "--set",
                "sampler.n_samples=500",
                "--out",
                "b.h5",
                "--set",
                "output.model=a.model.pt",
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "sample",
                str(example),
                *small,
                "--set",
                "sampler.n_samples=1500",
                "--out",
                "b.h5",
                "--set",
                "output.model=a.model.pt",
                "--resume",
            ]
        )
        == 0
    )
    capsys.readouterr()
    with h5py.File("a.h5", "r") as a, h5py.File("b.h5", "r") as b:
        sampler = json.loads(a.attrs["sampler"])
        assert sampler["kind"] == "pf-flow-mcmc" and sampler["even_odd"] is True
        for key in ("fields/links", "weights/log_p", "weights/log_q", "weights/proposal_log_w", "markov/accepted"):
            assert np.array_equal(a[key][:], b[key][:]), key
    assert cli.main(["analyze", "a.h5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acceptance"]["mean"] > 0.01
    assert {"plaquette", "chiral_condensate", "topological_charge_sq"} <= set(result)
