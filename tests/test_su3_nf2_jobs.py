"""SU(3) with Nf = 2 Wilson fermions ("su3-nf2") in job files: validation of every sampler kind, the PF-HMC
example end to end (run, verify, analyze, resume bit for bit), the joint pseudofermion flow against the exact
determinant from job files, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import stat_seed

from latflow.jobs import cli
from latflow.jobs.config import JobError, has_fermions, load_job, theories_with_fermions
from latflow.jobs.runner import build_theory
from latflow.manifolds import SUN

EXAMPLES = Path(__file__).resolve().parents[1] / "jobs" / "examples"
PF_HMC = EXAMPLES / "su3-nf2_pf_hmc.toml"
PF_FLOW = EXAMPLES / "su3-nf2_pf_flow.toml"
SMALL = [
    *("--set", "lattice.shape=[4, 4]", "--set", "sampler.n_chains=2", "--set", "sampler.n_tune=6"),
    *("--set", "sampler.thermalization=2", "--set", "sampler.commit_every=4"),
]


def _job(tmp_path: Path, sampler: str = "", model: str = "", name: str = "nf2.toml") -> Path:
    path = tmp_path / name
    path.write_text(
        '[theory]\nname = "su3-nf2"\nbeta = 4.0\nkappa = 0.2\n[lattice]\nshape = [4, 4]\n'
        f'[sampler]\nn_samples = 10\n{sampler}[model]\n{model}[output]\npath = "nf2.h5"\n',
        encoding="utf-8",
    )
    return path


def test_su3_nf2_has_fermions_and_su3_links() -> None:
    theory = build_theory(load_job(PF_HMC))
    assert has_fermions(theory) and isinstance(theory.manifold, SUN) and theory.manifold.n == 3
    assert theories_with_fermions() == ["schwinger", "su3-nf2", "yukawa"]


def test_su3_nf2_job_validation(tmp_path: Path) -> None:
    """Every sampler kind is accepted with its keys; the exact determinant is refused above the dense limit."""
    load_job(_job(tmp_path, 'kind = "pf-hmc"\neven_odd = true\nhasenbusch_kappas = [0.1]\nstart = "hot"\n'))
    load_job(_job(tmp_path, 'kind = "hmc"\nstart = "cold"\n'))
    spectral = 'kind = "sun-spectral"\nn_layers = 0\nprior = "plaquette"\n'
    load_job(_job(tmp_path, 'kind = "flow-mcmc"\n', spectral))
    job = load_job(_job(tmp_path, 'kind = "pf-flow-mcmc"\nconditional = "triangular"\n', spectral))
    assert job.uses_flow
    with pytest.raises(JobError, match=r"'sampler.kind' = 'hmc' on 'lattice.shape' = \[12, 12\].*864x864.*'pf-hmc'"):
        load_job(_job(tmp_path, 'kind = "hmc"\n'), ["lattice.shape=[12, 12]"])
    with pytest.raises(JobError, match=r"'sampler.kind' = 'flow-mcmc' on .*600 rows"):
        load_job(_job(tmp_path, 'kind = "flow-mcmc"\n', spectral), ["lattice.shape=[12, 12]"])
    load_job(_job(tmp_path, 'kind = "pf-hmc"\n'), ["lattice.shape=[12, 12]"])  # pseudofermions have no limit
    with pytest.raises(JobError, match=r"'model.kind' = 'u1-equivariant' is a flow for U\(1\) links; theory 'su3-nf2'"):
        load_job(_job(tmp_path, 'kind = "pf-flow-mcmc"\n', 'kind = "u1-equivariant"\n'))
    with pytest.raises(JobError, match=r"'sampler.hasenbusch_kappas' = \[0.25\]: must lie below theory.kappa = 0.2"):
        load_job(_job(tmp_path, 'kind = "pf-hmc"\nhasenbusch_kappas = [0.25]\n'))
    with pytest.raises(
        JobError, match=r"needs a theory with fermions \(schwinger, su3-nf2, yukawa\); theory 'su3' has none"
    ):
        load_job(EXAMPLES / "su3_hmc.toml", ["sampler.kind=pf-hmc"])


def test_pf_hmc_example_runs_verifies_analyzes_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    """The PF-HMC example, shrunk to 4x4 and 2 chains, from the command line; an interrupted run resumes bit for
    bit (links, condensate, Markov data)."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(PF_HMC), *SMALL, "--set", "sampler.n_samples=8", "--out", "a.h5"]) == 0
    assert cli.main(["run", str(PF_HMC), *SMALL, "--set", "sampler.n_samples=4", "--out", "b.h5"]) == 0
    assert cli.main(["sample", str(PF_HMC), *SMALL, "--set", "sampler.n_samples=8", "--out", "b.h5", "--resume"]) == 0
    assert cli.main(["verify", "a.h5"]) == 0
    capsys.readouterr()
    with h5py.File("a.h5", "r") as a, h5py.File("b.h5", "r") as b:
        assert a.attrs["theory"] == "su3-nf2"
        links = a["fields/links"][:]
        assert links.shape == (16, 2, 4, 4, 3, 3) and np.iscomplexobj(links)
        for name in ("fields/links", "observables/chiral_condensate", "observables/plaquette", "markov/accepted"):
            assert np.array_equal(a[name][:], b[name][:]), name
        sampler = json.loads(a.attrs["sampler"])
        assert sampler["kind"] == "pf-hmc" and sampler["even_odd"] is True and sampler["hasenbusch_kappas"] == [0.15]
        assert sampler["start"] == "cold"
    m = links.reshape(-1, 3, 3)
    assert np.abs(m @ np.conj(np.swapaxes(m, -1, -2)) - np.eye(3)).max() < 1e-10
    assert np.abs(np.linalg.det(m) - 1).max() < 1e-10
    assert cli.main(["analyze", "a.h5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acceptance"]["mean"] > 0.5
    assert {"plaquette", "chiral_condensate", "fermion_logdet", "gauge_action", "polyakov_loop"} <= set(result)


@pytest.mark.statistical
def test_pf_flow_job_agrees_with_the_exact_determinant_job(tmp_path: Path, monkeypatch, capsys, record_z) -> None:
    """The same job file on a 2x4 lattice (beta 4, kappa 0.2), plaquette prior alone: flow-MCMC on the exact
    S_eff and the joint pseudofermion flow-MCMC (exact conditional, even/odd, one Hasenbusch factor) agree on
    the plaquette and the chiral condensate within 3 sigma."""
    monkeypatch.chdir(tmp_path)
    seed = stat_seed(71)
    common = [
        *("--set", "lattice.shape=[2, 4]", "--set", "sampler.n_samples=3072", "--set", "sampler.batch_size=256"),
        *("--set", "sampler.commit_every=1024", "--set", f"run.seed={seed}"),
    ]
    assert cli.main(["run", str(PF_FLOW), *common, "--out", "pf.h5"]) == 0
    assert cli.main(["run", str(PF_FLOW), *common, "--set", "sampler.kind=flow-mcmc", "--out", "ex.h5"]) == 0
    capsys.readouterr()
    results = []
    for path in ("pf.h5", "ex.h5"):
        assert cli.main(["analyze", path, "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    pf, ex = results
    assert pf["acceptance"]["mean"] > 0.15 and ex["acceptance"]["mean"] > 0.15  # about 0.3 on this lattice
    for name in ("plaquette", "chiral_condensate"):
        a, b = pf[name], ex[name]
        z = (a["mean"] - b["mean"]) / np.hypot(a["err"], b["err"])
        record_z(name, z)
        assert abs(z) < 3, (name, a, b, z)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        (["sampler.kind=pf-hmc", "sampler.even_odd=true", "lattice.shape=[4, 5]"], "extent 5 is odd"),
        (["sampler.kind=pf-flow-mcmc", "lattice.shape=[18, 18]"], "'sampler.conditional' = 'exact'"),
        (["sampler.kind=pf-flow-mcmc", "model.kind=affine"], "'model.kind' = 'affine' is a flow for real scalar"),
        (["sampler.kind=pf-flow-mcmc", "sampler.start=cold"], "'sampler.start' = 'cold' is for sampler.kind"),
        (["theory.kappa=0.5"], "kappa must be in [0, 0.5)"),
        (["sampler.kind=pf-hmc", "sampler.start=missing.lime"], "'sampler.start' = 'missing.lime': no such file"),
    ],
)
def test_su3_nf2_bad_input_is_one_line(changes: list[str], needle: str) -> None:
    with pytest.raises(JobError) as info:
        load_job(PF_FLOW, changes)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
