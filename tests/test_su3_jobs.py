"""SU(3) in job files: validation, HMC from the command line against the exact torus plaquette, complex fields
through the writer, resume bit for bit, float32 as complex64, and starts from files."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import stat_seed

from latflow.jobs import cli
from latflow.jobs.config import JobError, field_manifold, load_job
from latflow.jobs.runner import build_theory, initial_field, read_start
from latflow.manifolds import SUN, Euclidean, U1Angles
from latflow.theories import REGISTRY
from latflow.theories.su3 import exact_plaquette

EXAMPLES = Path(__file__).resolve().parents[1] / "jobs" / "examples"
SMALL = [
    *("--set", "lattice.shape=[4, 4]", "--set", "sampler.n_chains=4", "--set", "sampler.n_tune=10"),
    *("--set", "sampler.thermalization=5", "--set", "sampler.commit_every=10"),
]


def _job(tmp_path: Path, text: str = "", name: str = "su3.toml") -> Path:
    path = tmp_path / name
    path.write_text(
        '[theory]\nname = "su3"\nbeta = 4.0\n[lattice]\nshape = [4, 4]\n[sampler]\nkind = "hmc"\nn_samples = 10\n'
        '[output]\npath = "su3.h5"\n' + text,
        encoding="utf-8",
    )
    return path


def test_su3_is_registered_and_declares_its_manifold() -> None:
    assert REGISTRY["su3"].field_name == "links"
    job = load_job(EXAMPLES / "su3_hmc.toml")
    theory = build_theory(job)
    assert isinstance(field_manifold(theory), SUN) and field_manifold(theory).n == 3
    # theories that declare nothing keep their dynamics: U(1) angles for links, real fields otherwise
    assert type(field_manifold(REGISTRY["u1"].build(REGISTRY["u1"].params(beta=1.0), theory.lattice))) is U1Angles
    phi4 = load_job(EXAMPLES / "phi4_hmc.toml")
    assert type(field_manifold(build_theory(phi4))) is Euclidean


def test_su3_job_validation(tmp_path: Path) -> None:
    """HMC and spectral flows are accepted; other flows and pseudofermions are one-line errors naming the key."""
    load_job(_job(tmp_path))
    flow = ["sampler.kind=flow-mcmc"]
    load_job(_job(tmp_path, '[model]\nkind = "sun-spectral"\n'), flow)
    with pytest.raises(JobError, match=r"'model.kind' = 'u1-equivariant' is a flow for U\(1\) links; theory 'su3'"):
        load_job(_job(tmp_path, '[model]\nkind = "u1-equivariant"\n'), flow)
    with pytest.raises(JobError, match=r"'model.kind' = 'affine'.*use model.kind 'sun-spectral' or sampler.kind 'hmc'"):
        load_job(_job(tmp_path), flow)
    with pytest.raises(JobError, match=r"'model.kind' = 'sun-spectral' is a flow for SU\(N\) links; theory 'u1'"):
        load_job(EXAMPLES / "u1_flow.toml", ["model.kind=sun-spectral"])
    with pytest.raises(JobError, match=r"'model.prior' = 'plaquette' on 'lattice.shape' = \[4, 4, 4, 4\]"):
        plaquette = '[model]\nkind = "sun-spectral"\nprior = "plaquette"\n'
        load_job(_job(tmp_path, plaquette), [*flow, "lattice.shape=[4,4,4,4]"])
    with pytest.raises(JobError, match=r"'sampler.kind' = 'pf-hmc' needs a theory with fermions"):
        load_job(_job(tmp_path), ["sampler.kind=pf-hmc"])
    with pytest.raises(JobError, match=r"'sampler.start' = 'cold' is for sampler.kind 'hmc' or 'pf-hmc'"):
        load_job(_job(tmp_path), ["sampler.kind=flow-mcmc", "sampler.start=cold"])
    with pytest.raises(JobError, match=r"su3.toml: 'sampler.start' = 'nowhere.h5': no such file; allowed: 'default'"):
        load_job(_job(tmp_path), ["sampler.start=nowhere.h5"])
    with pytest.raises(JobError, match=r"\[theory\]: SU\(N\) needs an integer N >= 2, got n = 1"):
        load_job(_job(tmp_path), ["theory.n=1"])


@pytest.mark.statistical
def test_su3_hmc_job_end_to_end(tmp_path: Path, latflow_cli) -> None:
    """`latflow run` of the 2D SU(3) example (4x4, 8 chains) in a fresh interpreter, then `verify` and
    `analyze --json`: the plaquette agrees with the exact torus value (|z| < 3) that analyze knows."""
    seed = stat_seed(4242)
    args = ["run", str(EXAMPLES / "su3_hmc.toml"), "--set", "lattice.shape=[4, 4]", "--set", "sampler.n_chains=8"]
    args += ["--set", "sampler.n_samples=120", "--set", f"run.seed={seed}", "--out", "e.h5"]
    r = latflow_cli.run(args, tmp_path, timeout=600)
    assert r.returncode == 0, str(r)
    r = latflow_cli.run(["verify", "e.h5"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("OK"), str(r)
    r = latflow_cli.run(["analyze", "e.h5", "--json"], tmp_path)
    assert r.returncode == 0, str(r)
    result = json.loads(r.stdout)
    exact = exact_plaquette(4.0, 3, (4, 4))
    assert result["ensemble"]["known_means"]["plaquette"] == pytest.approx(exact, rel=1e-12)
    z = (result["plaquette"]["mean"] - exact) / result["plaquette"]["err"]
    assert abs(z) < 3, (result["plaquette"], exact, z)
    assert result["acceptance"]["mean"] > 0.7
    with h5py.File(tmp_path / "e.h5", "r") as f:
        links = f["fields/links"]
        assert links.dtype == np.complex128 and links.shape == (120 * 8, 2, 4, 4, 3, 3)
        u = links[-8:]
        assert np.abs(u @ np.conj(np.swapaxes(u, -1, -2)) - np.eye(3)).max() < 1e-12
        assert json.loads(f.attrs["sampler"])["start"] == "cold"


def test_su3_hmc_resumes_bit_for_bit(tmp_path: Path, monkeypatch, capsys) -> None:
    """20 trajectories in one run equal 10 + 10 with --resume (fields, observables, Markov data)."""
    monkeypatch.chdir(tmp_path)
    example = str(EXAMPLES / "su3_hmc.toml")
    assert cli.main(["run", example, *SMALL, "--set", "sampler.n_samples=20", "--out", "a.h5"]) == 0
    assert cli.main(["run", example, *SMALL, "--set", "sampler.n_samples=10", "--out", "b.h5"]) == 0
    assert cli.main(["sample", example, *SMALL, "--set", "sampler.n_samples=20", "--out", "b.h5", "--resume"]) == 0
    capsys.readouterr()
    with h5py.File("a.h5", "r") as a, h5py.File("b.h5", "r") as b:
        assert a.attrs["theory"] == "su3"
        for name in ("fields/links", "observables/plaquette", "observables/polyakov_loop", "markov/accepted"):
            assert np.array_equal(a[name][:], b[name][:]), name
        assert a["fields/links"].dtype == np.complex128


def test_su3_float32_runs_as_complex64(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    example = str(EXAMPLES / "su3_hmc.toml")
    args = ["run", example, *SMALL, "--set", "sampler.n_samples=10", "--set", "run.dtype=float32", "--out", "f.h5"]
    assert cli.main(args) == 0
    assert cli.main(["verify", "f.h5"]) == 0
    capsys.readouterr()
    with h5py.File("f.h5", "r") as f:
        assert f["fields/links"].dtype == np.complex64
        assert np.abs(np.linalg.det(f["fields/links"][-4:]) - 1).max() < 1e-5
        assert np.all(np.isfinite(f["observables/plaquette"][:]))


def test_starts_cold_hot_and_from_an_ensemble(tmp_path: Path, monkeypatch, capsys) -> None:
    """`sampler.start`: cold = unit links, hot = Haar links, a file = its last stored configuration on every
    chain; the chain continued from an ensemble starts where that ensemble stopped."""
    monkeypatch.chdir(tmp_path)
    example = str(EXAMPLES / "su3_hmc.toml")
    assert cli.main(["run", example, *SMALL, "--set", "sampler.n_samples=10", "--out", "a.h5"]) == 0
    capsys.readouterr()
    gen = torch.Generator().manual_seed(1)
    dev = torch.device("cpu")
    cold = load_job(example, ["lattice.shape=[4, 4]", "sampler.start=cold"])
    theory = build_theory(cold)
    u = initial_field(cold, theory, 3, gen, dev)
    assert torch.equal(u, torch.eye(3, dtype=torch.complex128).expand(3, 2, 4, 4, 3, 3))
    hot = load_job(example, ["lattice.shape=[4, 4]", "sampler.start=hot"])
    u = initial_field(hot, theory, 3, gen, dev)
    assert theory.observables(u)["plaquette"].abs().max() < 0.5
    from_file = load_job(example, ["lattice.shape=[4, 4]", "sampler.start=a.h5", "run.dtype=float32"])
    u = initial_field(from_file, theory, 3, gen, dev)
    with h5py.File("a.h5", "r") as f:
        last = torch.from_numpy(f["fields/links"][-1])
    assert u.dtype == torch.complex64 and u.shape == (3, 2, 4, 4, 3, 3)
    assert (u - last.to(torch.complex64)).abs().max() < 1e-6
    # a whole run from the file: its first trajectories stay near the equilibrium plaquette
    args = ["run", example, *SMALL, "--set", "sampler.start=a.h5", "--set", "sampler.n_tune=0"]
    args += ["--set", "sampler.thermalization=0", "--set", "sampler.n_samples=2", "--out", "c.h5"]
    assert cli.main(args) == 0
    capsys.readouterr()
    with h5py.File("c.h5", "r") as c:
        assert json.loads(c.attrs["sampler"])["start"] == "a.h5"
        assert abs(c["observables/plaquette"][:4].mean() - exact_plaquette(4.0, 3, (4, 4))) < 0.2


@pytest.mark.parametrize("fmt", ["ildg", "nersc"])
def test_start_from_a_configuration_file(fmt: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """An ILDG / NERSC file written from an ensemble's last configuration starts HMC from those links."""
    from latflow.configio import write_configuration

    monkeypatch.chdir(tmp_path)
    example = str(EXAMPLES / "su3_hmc.toml")
    assert cli.main(["run", example, *SMALL, "--set", "sampler.n_samples=5", "--out", "a.h5"]) == 0
    capsys.readouterr()
    with h5py.File("a.h5", "r") as f:
        last = f["fields/links"][-1]
    write_configuration(f"conf.{fmt}", last, fmt, beta=4.0)
    job = load_job(example, ["lattice.shape=[4, 4]", f"sampler.start=conf.{fmt}"])
    u = initial_field(job, build_theory(job), 2, torch.Generator(), torch.device("cpu"))
    assert u.shape == (2, 2, 4, 4, 3, 3) and (u - torch.from_numpy(last)).abs().max() < 1e-12
    args = ["sample", example, *SMALL, "--set", f"sampler.start=conf.{fmt}", "--set", "sampler.n_samples=2"]
    assert cli.main([*args, "--out", "c.h5"]) == 0
    wrong = load_job(example, ["lattice.shape=[6, 6]", f"sampler.start=conf.{fmt}"])
    with pytest.raises(JobError, match=r"'sampler.start'"):
        read_start(wrong, build_theory(wrong))


def test_bad_start_files_are_one_line_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    example = str(EXAMPLES / "su3_hmc.toml")
    assert cli.main(["run", example, *SMALL, "--set", "sampler.n_samples=2", "--out", "a.h5"]) == 0
    assert (
        cli.main(["run", str(EXAMPLES / "u1_hmc.toml"), *SMALL, "--set", "sampler.n_samples=2", "--out", "u.h5"]) == 0
    )
    capsys.readouterr()
    with h5py.File("p.h5", "w") as f:
        f["x"] = np.arange(3)
    Path("conf.lime").write_bytes(b"\0" * 64)
    cases = {
        "a.h5": (["lattice.shape=[6, 6]"], r"shape \[2, 4, 4, 3, 3\].*needs \[2, 6, 6, 3, 3\]"),
        "u.h5": (["lattice.shape=[4, 4]"], r"shape \[2, 4, 4\].*needs \[2, 4, 4, 3, 3\]"),
        "p.h5": (["lattice.shape=[4, 4]"], r"not a latflow ensemble"),
        "conf.lime": (["lattice.shape=[4, 4]"], r"'sampler.start' = 'conf.lime'"),
    }
    for name, (sets, pattern) in cases.items():
        job = load_job(example, [*sets, f"sampler.start={name}"])
        with pytest.raises(JobError, match=pattern) as info:
            read_start(job, build_theory(job))
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(example) and "'sampler.start'" in msg, msg
    # links that are not in SU(3)
    job = load_job(example, ["lattice.shape=[4, 4]", "sampler.start=a.h5"])
    with h5py.File("a.h5", "r+") as f:
        f["fields/links"][-1] = 2 * f["fields/links"][-1]
    with pytest.raises(JobError, match=r"not su3 links \(max \|U\^dagger U - 1\|"):
        read_start(job, build_theory(job))


def test_4d_example_validates_and_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    example = str(EXAMPLES / "su3_4d_hmc.toml")
    job = load_job(example)
    assert len(job.lattice.shape) == 4 and 5.5 <= job.theory.couplings.beta <= 6
    small = ["--set", "lattice.shape=[2, 2, 2, 2]", "--set", "sampler.n_chains=2", "--set", "sampler.n_tune=3"]
    small += ["--set", "sampler.thermalization=0", "--set", "sampler.n_samples=3", "--set", "sampler.commit_every=3"]
    small += ["--set", "output.save_every=1"]
    assert cli.main(["run", example, *small, "--out", "d.h5"]) == 0
    capsys.readouterr()
    with h5py.File("d.h5", "r") as f:
        assert {"topological_charge", "polyakov_loop", "plaquette"} <= set(f["observables"])
        assert f["fields/links"].shape == (6, 4, 2, 2, 2, 2, 3, 3)


@pytest.mark.statistical
def test_su3_spectral_flow_job_trains_samples_resumes_and_is_exact(tmp_path: Path, monkeypatch, capsys) -> None:
    """`model.kind = 'sun-spectral'` with flow-MCMC (the example, briefly trained): the plaquette agrees with the
    exact 4x4 torus value at beta = 2 within |z| < 3, and a resumed sampling run equals an uninterrupted one."""
    monkeypatch.chdir(tmp_path)
    example = str(EXAMPLES / "su3_flow.toml")
    seed = stat_seed(4343)
    common = ["--set", "train.steps=20", "--set", f"run.seed={seed}", "--set", "output.model=m.pt"]
    common += ["--set", "sampler.commit_every=256"]
    assert cli.main(["run", example, *common, "--set", "sampler.n_samples=2048", "--out", "a.h5"]) == 0
    assert cli.main(["sample", example, *common, "--set", "sampler.n_samples=256", "--out", "b.h5"]) == 0
    assert cli.main(["sample", example, *common, "--set", "sampler.n_samples=512", "--out", "b.h5", "--resume"]) == 0
    capsys.readouterr()
    with h5py.File("a.h5", "r") as a, h5py.File("b.h5", "r") as b:
        assert a["fields/links"].dtype == np.complex128
        for name in ("fields/links", "observables/plaquette", "weights/log_q", "markov/accepted"):
            assert np.array_equal(a[name][:512], b[name][:]), name
    assert cli.main(["analyze", "a.h5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    exact = exact_plaquette(2.0, 3, (4, 4))
    z = (result["plaquette"]["mean"] - exact) / result["plaquette"]["err"]
    assert abs(z) < 3, (result["plaquette"], exact, z)
    assert result["acceptance"]["mean"] > 0.3
