"""Bad input to the ``latflow`` command: a one-line error, exit code 2, and nothing touched.

Every case runs the real command line in its own process (see ``latflow_cli`` in conftest.py) in
a fresh folder and checks that

- the exit code is 2 and stdout is empty;
- stderr is exactly one line, starting with ``latflow: error:``, that names the job file (or the
  ensemble / checkpoint the mistake is about), the offending key and what is allowed;
- nothing anywhere prints a traceback;
- no file in the folder was created, changed or even re-written (names, sizes, mtimes, modes and
  sha256 of every entry are compared; an existing ensemble or model stays byte-identical).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest


@dataclass(frozen=True)
class Case:
    """``setup(folder, files)`` prepares the folder; ``args`` is the command line."""

    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]  # substrings of the error line: file, key, what is allowed
    setup: Callable[[Path, Files], None] = lambda d, f: None
    skip: Callable[[], str] = lambda: ""


@dataclass(frozen=True)
class Files:
    """Ready-made files (built once per module) and the job writer."""

    root: Path
    make_job: Callable

    def job(self, d: Path, kind: str = "flow", name: str = "job.toml", **changes) -> Path:
        return self.make_job(d, kind, {k.replace("__", "."): v for k, v in changes.items()}, name)

    def copy(self, d: Path, *names: str) -> None:
        for n in names:
            shutil.copy2(self.root / n, d / n)


DROP = "DROP"  # replaced by make_job.DROP in the ``files`` fixture


def _u1_flow(model: str, shape: str = "[4, 4]") -> str:
    """The U(1) job as a flow-MCMC job on ``shape`` with the ``[model]`` table ``model`` (TOML lines)."""
    text = U1_JOB.replace('kind = "hmc"', 'kind = "flow-mcmc"').replace("shape = [4, 4]", f"shape = {shape}")
    return text + '\n[model]\nkind = "u1-equivariant"\n' + model


U1_JOB = """[theory]
name = "u1"
beta = 2.0

[lattice]
shape = [4, 4]

[sampler]
kind = "hmc"
n_samples = 10

[output]
path = "u1.h5"
"""


SU3_JOB = U1_JOB.replace('name = "u1"', 'name = "su3"').replace('path = "u1.h5"', 'path = "su3.h5"')


def _job(kind: str = "flow", name: str = "job.toml", **changes) -> Callable[[Path, Files], None]:
    def setup(d: Path, f: Files) -> None:
        ch = {k: (f.make_job.DROP if v == DROP else v) for k, v in changes.items()}
        f.job(d, kind, name, **ch)

    return setup


def _text(name: str, text: str) -> Callable[[Path, Files], None]:
    def setup(d: Path, f: Files) -> None:
        (d / name).write_text(text, encoding="utf-8")

    return setup


def _both(*setups: Callable[[Path, Files], None]) -> Callable[[Path, Files], None]:
    def setup(d: Path, f: Files) -> None:
        for s in setups:
            s(d, f)

    return setup


def _copy(*names: str) -> Callable[[Path, Files], None]:
    return lambda d, f: f.copy(d, *names)


def _mkdir(name: str) -> Callable[[Path, Files], None]:
    return lambda d, f: (d / name).mkdir()


def _unreadable(d: Path, f: Files) -> None:
    f.job(d)
    os.chmod(d / "job.toml", 0)


def _cuda_available() -> str:
    import torch

    return "CUDA is available here" if torch.cuda.is_available() else ""


def _running_as_root() -> str:
    return "root reads files whatever their mode" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""


TRAINED = _copy("ens.model.pt")  # flow model of the default flow job (output.path = ens.h5)
SAMPLED = _copy("ens.model.pt", "ens.h5")

CASES = [
    # --- the job file's content -----------------------------------------------------------
    Case(
        "su3-scalar-flow",
        ("train", "su3.toml"),
        ("su3.toml", "'model.kind'", "'affine'", "SU(N) links", "'sun-spectral'", "'hmc'"),
        _text("su3.toml", SU3_JOB.replace('kind = "hmc"', 'kind = "flow-mcmc"')),
    ),
    Case(
        "su3-start-no-such-file",
        ("sample", "su3.toml"),
        ("su3.toml", "'sampler.start'", "nowhere.h5", "no such file", "'cold'", "'hot'"),
        _text("su3.toml", SU3_JOB.replace('kind = "hmc"', 'kind = "hmc"\nstart = "nowhere.h5"')),
    ),
    Case(
        "su3-start-from-a-scalar-ensemble",
        ("sample", "su3.toml"),
        ("su3.toml", "'sampler.start'", "hmc.h5", "no fields/links", "'su3'"),
        _both(
            _copy("hmc.h5"),
            _text("su3.toml", SU3_JOB.replace('kind = "hmc"', 'kind = "hmc"\nstart = "hmc.h5"')),
        ),
    ),
    Case(
        "unknown-key", ("train", "job.toml"), ("job.toml", "'train.stepz'", "steps", "batch_size"), _job(train__stepz=3)
    ),
    Case(
        "unknown-section",
        ("train", "job.toml"),
        ("job.toml", "'sampling'", "theory", "lattice", "sampler"),
        _both(_job(), lambda d, f: (d / "job.toml").write_text((d / "job.toml").read_text() + "\n[sampling]\nn = 3\n")),
    ),
    Case(
        "unknown-top-level-key",
        ("train", "job.toml"),
        ("job.toml", "'seed'", "run"),
        _both(_job(), lambda d, f: (d / "job.toml").write_text("seed = 3\n" + (d / "job.toml").read_text())),
    ),
    Case(
        "string-for-number",
        ("train", "job.toml"),
        ("job.toml", "'theory.lam'", "'big'", "a number"),
        _job(theory__lam="big"),
    ),
    Case(
        "float-for-int",
        ("train", "job.toml"),
        ("job.toml", "'train.steps'", "2.5", "an integer"),
        _job(train__steps=2.5),
    ),
    Case(
        "bool-for-int",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'sampler.n_samples'", "True", "an integer"),
        _job("hmc", "hmc.toml", sampler__n_samples=True),
    ),
    Case(
        "string-for-bool",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'sampler.tune'", "true or false"),
        _job("hmc", "hmc.toml", sampler__tune="yes"),
    ),
    Case("missing-theory-section", ("train", "job.toml"), ("job.toml", "[theory]", "name", "phi4"), _job(theory=DROP)),
    Case("missing-lattice-section", ("train", "job.toml"), ("job.toml", "[lattice]", "shape"), _job(lattice=DROP)),
    Case(
        "missing-output-section",
        ("sample", "hmc.toml"),
        ("hmc.toml", "[output]", "path"),
        _job("hmc", "hmc.toml", output=DROP),
    ),
    Case("missing-theory-name", ("train", "job.toml"), ("job.toml", "'theory.name'", "phi4"), _job(theory__name=DROP)),
    Case(
        "unknown-theory",
        ("train", "job.toml"),
        ("job.toml", "'theory.name'", "'phi6'", "phi4"),
        _job(theory__name="phi6"),
    ),
    Case(
        "theory-name-not-a-string", ("train", "job.toml"), ("job.toml", "'theory.name'", "phi4"), _job(theory__name=[4])
    ),
    Case("missing-coupling", ("train", "job.toml"), ("job.toml", "'theory.lam'", "a number"), _job(theory__lam=DROP)),
    Case("unknown-coupling", ("train", "job.toml"), ("job.toml", "'theory.beta'", "m2", "lam"), _job(theory__beta=1.0)),
    Case(
        "nan-coupling",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'theory.lam'", "nan", "finite"),
        _job("hmc", "hmc.toml", theory__lam=float("nan")),
    ),
    Case(
        "inf-step-size",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'sampler.step_size'", "inf", "finite"),
        _job("hmc", "hmc.toml", sampler__step_size=float("inf")),
    ),
    Case(
        "negative-extent",
        ("train", "job.toml"),
        ("job.toml", "'lattice.shape'", "-4", "positive"),
        _job(lattice__shape=[-4, 4]),
    ),
    Case(
        "zero-extent",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'lattice.shape'", "[4, 0]", "positive"),
        _job("hmc", "hmc.toml", lattice__shape=[4, 0]),
    ),
    Case(
        "shape-not-a-list",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'lattice.shape'", "a list of integers"),
        _job("hmc", "hmc.toml", lattice__shape=4),
    ),
    Case(
        "five-dimensions",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'lattice.shape'", "1 to 4"),
        _job("hmc", "hmc.toml", lattice__shape=[2, 2, 2, 2, 2]),
    ),
    Case(
        "odd-extent-affine",
        ("train", "job.toml"),
        ("job.toml", "'lattice.shape'", "5", "even", "affine"),
        _job(lattice__shape=[5, 4]),
    ),
    Case(
        "u1-in-one-dimension",
        ("sample", "u1.toml"),
        ("u1.toml", "'lattice.shape'", "d >= 2"),
        _text("u1.toml", U1_JOB.replace("shape = [4, 4]", "shape = [8]")),
    ),
    Case(
        "scalar-flow-for-gauge-links",
        ("train", "u1.toml"),
        ("u1.toml", "'model.kind'", "'affine'", "'u1-equivariant'", "'hmc'"),
        _text("u1.toml", U1_JOB.replace('kind = "hmc"', 'kind = "flow-mcmc"')),
    ),
    Case(
        "u1-flow-on-extent-5",
        ("train", "u1.toml"),
        ("u1.toml", "'lattice.shape'", "u1-equivariant"),
        _text(
            "u1.toml",
            U1_JOB.replace('kind = "hmc"', 'kind = "flow-mcmc"').replace("shape = [4, 4]", "shape = [5, 5]")
            + '\n[model]\nkind = "u1-equivariant"\n',
        ),
    ),
    Case(
        "plaquette-prior-in-three-dimensions",
        ("train", "u1.toml"),
        ("u1.toml", "'model.prior'", "'plaquette'", "2D", "'haar'"),
        _text(
            "u1.toml",
            _u1_flow('prior = "plaquette"\n', "[4, 4, 4]"),
        ),
    ),
    Case(
        "unknown-prior",
        ("train", "u1.toml"),
        ("u1.toml", "'model.prior'", "'haar'", "'plaquette'"),
        _text("u1.toml", _u1_flow('prior = "gaussian"\n')),
    ),
    Case(
        "no-layers-on-the-haar-prior",
        ("train", "u1.toml"),
        ("u1.toml", "'model.n_layers' = 0", "'plaquette'"),
        _text("u1.toml", _u1_flow("n_layers = 0\n")),
    ),
    Case(
        "prior-beta-without-the-plaquette-prior",
        ("train", "u1.toml"),
        ("u1.toml", "'model.prior_beta'", "'haar'", "'plaquette'"),
        _text("u1.toml", _u1_flow("prior_beta = 2.0\n")),
    ),
    Case(
        "negative-prior-beta",
        ("train", "u1.toml"),
        ("u1.toml", "'model.prior_beta'", ">= 0"),
        _text("u1.toml", _u1_flow('prior = "plaquette"\nprior_beta = -1.0\n')),
    ),
    Case(
        "plaquette-prior-for-a-scalar-field",
        ("train", "job.toml"),
        ("job.toml", "'model.prior'", "'affine'", "prior_sigma"),
        _job(model__prior="plaquette"),
    ),
    Case(
        "fermion-training-target-without-fermions",
        ("train", "u1.toml"),
        ("u1.toml", "'train.target'", "'gauge'", "fermions", "'auto'"),
        _text("u1.toml", _u1_flow("") + '\n[train]\ntarget = "gauge"\n'),
    ),
    Case(
        "pf-hmc-without-fermions",
        ("sample", "u1.toml"),
        ("u1.toml", "'sampler.kind'", "'pf-hmc'", "schwinger", "'hmc'"),
        _text("u1.toml", U1_JOB.replace('kind = "hmc"', 'kind = "pf-hmc"')),
    ),
    Case(
        "pf-flow-mcmc-without-fermions",
        ("train", "u1.toml"),
        ("u1.toml", "'sampler.kind'", "'pf-flow-mcmc'", "schwinger"),
        _text(
            "u1.toml", U1_JOB.replace('kind = "hmc"', 'kind = "pf-flow-mcmc"') + '\n[model]\nkind = "u1-equivariant"\n'
        ),
    ),
    Case(
        "pf-hmc-on-pure-su3-lists-the-theories-with-fermions",
        ("sample", "su3.toml"),
        ("su3.toml", "'sampler.kind'", "'pf-hmc'", "schwinger, su3-nf2", "theory 'su3' has none", "'hmc'"),
        _text("su3.toml", SU3_JOB.replace('kind = "hmc"', 'kind = "pf-hmc"')),
    ),
    Case(
        "su3-nf2-exact-determinant-above-the-dense-limit",
        ("sample", "nf2.toml"),
        ("nf2.toml", "'sampler.kind' = 'hmc'", "[12, 12]", "864x864", "600 rows", "'pf-hmc'"),
        _text(
            "nf2.toml",
            SU3_JOB.replace('name = "su3"\nbeta = 2.0', 'name = "su3-nf2"\nbeta = 2.0\nkappa = 0.2').replace(
                "shape = [4, 4]", "shape = [12, 12]"
            ),
        ),
    ),
    Case(
        "su3-nf2-hasenbusch-kappa-above-kappa",
        ("sample", "nf2.toml"),
        ("nf2.toml", "'sampler.hasenbusch_kappas'", "theory.kappa = 0.2"),
        _text(
            "nf2.toml",
            SU3_JOB.replace('name = "su3"\nbeta = 2.0', 'name = "su3-nf2"\nbeta = 2.0\nkappa = 0.2').replace(
                'kind = "hmc"', 'kind = "pf-hmc"\nhasenbusch_kappas = [0.3]'
            ),
        ),
    ),
    Case(
        "schwinger-kappa-out-of-range",
        ("sample", "s.toml"),
        ("s.toml", "[theory]", "kappa", "0.7", "[0, 0.5)"),
        _text("s.toml", U1_JOB.replace('name = "u1"\nbeta = 2.0', 'name = "schwinger"\nbeta = 2.0\nkappa = 0.7')),
    ),
    Case(
        "hasenbusch-kappa-above-kappa",
        ("sample", "s.toml"),
        ("s.toml", "'sampler.hasenbusch_kappas'", "theory.kappa"),
        _text(
            "s.toml",
            U1_JOB.replace('name = "u1"\nbeta = 2.0', 'name = "schwinger"\nbeta = 2.0\nkappa = 0.2').replace(
                'kind = "hmc"', 'kind = "pf-hmc"\nhasenbusch_kappas = [0.1, 0.25]'
            ),
        ),
    ),
    Case(
        "hasenbusch-kappas-not-increasing",
        ("sample", "s.toml"),
        ("s.toml", "'sampler.hasenbusch_kappas'", "increasing"),
        _text(
            "s.toml",
            U1_JOB.replace('name = "u1"\nbeta = 2.0', 'name = "schwinger"\nbeta = 2.0\nkappa = 0.2').replace(
                'kind = "hmc"', 'kind = "pf-hmc"\nhasenbusch_kappas = [0.15, 0.1]'
            ),
        ),
    ),
    Case(
        "unknown-sampler-kind",
        ("sample", "job.toml"),
        ("job.toml", "'sampler.kind'", "'gibbs'", "'flow-mcmc'", "'hmc'"),
        _job(sampler__kind="gibbs"),
    ),
    Case(
        "key-of-another-sampler-kind",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'sampler.batch_size' = 64", "'flow-mcmc'", "not a setting of sampler kind 'hmc'", "n_chains"),
        _job("hmc", "hmc.toml", sampler__batch_size=64),
    ),
    Case(
        "set-key-of-another-sampler-kind",
        ("train", "job.toml", "--set", "sampler.n_chains=4"),
        ("job.toml", "'sampler.n_chains'", "not a setting of sampler kind 'flow-mcmc'", "batch_size"),
        _job(),
    ),
    Case(
        "unknown-integrator",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'sampler.integrator'", "'leapfrog'", "'omelyan'"),
        _job("hmc", "hmc.toml", sampler__integrator="verlet"),
    ),
    Case(
        "unknown-dtype",
        ("train", "job.toml"),
        ("job.toml", "'run.dtype'", "'float64'", "'float32'"),
        _job(run__dtype="float16"),
    ),
    Case(
        "commit-every-zero",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'sampler.commit_every'", "positive"),
        _job("hmc", "hmc.toml", sampler__commit_every=0),
    ),
    Case(
        "target-acceptance-1.5",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'sampler.target_acceptance'", "1.5", "(0, 1)"),
        _job("hmc", "hmc.toml", sampler__target_acceptance=1.5),
    ),
    Case("even-kernel", ("train", "job.toml"), ("job.toml", "'model.kernel_size'", "odd"), _job(model__kernel_size=4)),
    Case(
        "negative-seed",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'run.seed'", "-1", "[0, 2**64)"),
        _job("hmc", "hmc.toml", run__seed=-1),
    ),
    Case(
        "model-equals-ensemble",
        ("train", "job.toml"),
        ("job.toml", "'output.model'", "'output.path'"),
        _job(output__model="ens.h5"),
    ),
    Case(
        "train-hmc-job",
        ("train", "hmc.toml"),
        ("hmc.toml", "'sampler.kind'", "'hmc'", "latflow sample"),
        _job("hmc", "hmc.toml"),
    ),
    # --- jobs that cannot run: refused before anything starts --------------------------------
    Case(
        "phi4-negative-lam",
        ("sample", "hmc.toml"),
        ("hmc.toml", "[theory]", "lam = -1.0", ">= 0", "unbounded"),
        _job("hmc", "hmc.toml", theory__lam=-1.0),
    ),
    Case(
        "phi4-free-zero-mode",
        ("sample", "hmc.toml"),
        ("hmc.toml", "[theory]", "m2 = -1.0", "lam = 0", "m2 > 0"),
        _job("hmc", "hmc.toml", theory__lam=0.0, theory__m2=-1.0),
    ),
    Case(
        "phi4-free-massless",
        ("train", "job.toml"),
        ("job.toml", "[theory]", "m2 = 0.0", "m2 > 0"),
        _job(theory__lam=0.0, theory__m2=0.0),
    ),
    Case(
        "even-odd-on-odd-extent",
        ("sample", "s.toml"),
        ("s.toml", "'sampler.even_odd'", "[5, 5]", "even extents"),
        _text(
            "s.toml",
            U1_JOB.replace('name = "u1"\nbeta = 2.0', 'name = "schwinger"\nbeta = 2.0\nkappa = 0.2')
            .replace("shape = [4, 4]", "shape = [5, 5]")
            .replace('kind = "hmc"', 'kind = "pf-hmc"\neven_odd = true'),
        ),
    ),
    Case(
        "train-zero-steps", ("train", "job.toml"), ("job.toml", "'train.steps'", "0", "positive"), _job(train__steps=0)
    ),
    Case(
        "run-zero-steps",
        ("run", "job.toml", "--set", "train.steps=0"),
        ("job.toml", "'train.steps'", "0", "positive"),
        _job(),
    ),
    Case(
        "save-every-zero",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'output.save_every'", "0", "positive"),
        _job("hmc", "hmc.toml", output__save_every=0),
    ),
    Case(
        "unknown-compression",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'output.compression'", "'zstd'", "'gzip'", "'lzf'", "'none'"),
        _job("hmc", "hmc.toml", output__compression="zstd"),
    ),
    Case(
        "compression-level-12",
        ("sample", "hmc.toml"),
        ("hmc.toml", "'output.compression_level'", "12", "[1, 9]"),
        _job("hmc", "hmc.toml", output__compression="gzip", output__compression_level=12),
    ),
    # --- the job file itself ---------------------------------------------------------------
    Case(
        "not-toml",
        ("train", "job.toml"),
        ("job.toml", "not valid TOML"),
        _text("job.toml", "this is not a job file\n[theory\n"),
    ),
    Case("binary-job-file", ("train", "ens.h5"), ("ens.h5", "not a TOML job file"), SAMPLED),
    Case("missing-job-file", ("train", "nope.toml"), ("nope.toml", "no such job file")),
    Case(
        "unreadable-job-file",
        ("train", "job.toml"),
        ("job.toml", "cannot read job file"),
        _unreadable,
        skip=_running_as_root,
    ),
    Case(
        "job-file-symlink-loop",
        ("train", "job.toml"),
        ("job.toml", "cannot read job file"),
        lambda d, f: os.symlink("job.toml", d / "job.toml"),
    ),
    Case("directory-as-job-file", ("sample", "jobs.d"), ("jobs.d", "is a directory", "job file"), _mkdir("jobs.d")),
    # --- --set / --out / --device ------------------------------------------------------------
    Case(
        "set-without-equals",
        ("train", "job.toml", "--set", "theory.lam"),
        ("job.toml", "--set", "'theory.lam'", "KEY=VALUE"),
        _job(),
    ),
    Case(
        "set-unknown-section",
        ("train", "job.toml", "--set", "physics.lam=1"),
        ("job.toml", "'physics'", "theory", "sampler"),
        _job(),
    ),
    Case(
        "set-without-section",
        ("train", "job.toml", "--set", "lam=1"),
        ("job.toml", "'lam=1'", "SECTION.NAME", "theory"),
        _job(),
    ),
    Case(
        "set-unknown-key",
        ("train", "job.toml", "--set", "train.stepz=3"),
        ("job.toml", "'train.stepz'", "steps"),
        _job(),
    ),
    Case(
        "set-wrong-type",
        ("train", "job.toml", "--set", "train.steps=many"),
        ("job.toml", "'train.steps'", "'many'", "an integer"),
        _job(),
    ),
    Case(
        "set-wrong-list",
        ("sample", "hmc.toml", "--set", "lattice.shape=[4,x]"),
        ("hmc.toml", "'lattice.shape'", "a list of integers"),
        _job("hmc", "hmc.toml"),
    ),
    Case(
        "device-cuda-without-cuda",
        ("sample", "hmc.toml", "--device", "cuda"),
        ("hmc.toml", "'run.device'", "'cuda'", "'cpu'"),
        _job("hmc", "hmc.toml"),
        skip=_cuda_available,
    ),
    # --- outputs -----------------------------------------------------------------------------
    Case(
        "sample-over-existing-ensemble",
        ("sample", "job.toml"),
        ("ens.h5", "exists", "--resume", "--force"),
        _both(_job(), SAMPLED),
    ),
    Case(
        "run-over-existing-ensemble",
        ("run", "job.toml"),
        ("ens.h5", "exists", "--resume", "--force"),
        _both(_job(), SAMPLED),
    ),
    Case(
        "run-hmc-over-existing-ensemble",
        ("run", "hmc.toml"),
        ("hmc.h5", "exists", "--resume", "--force"),
        _both(_job("hmc", "hmc.toml"), _copy("hmc.h5")),
    ),
    Case(
        "train-over-existing-model",
        ("train", "job.toml"),
        ("ens.model.pt", "exists", "--resume", "--force"),
        _both(_job(), TRAINED),
    ),
    Case(
        "output-folder-missing",
        ("train", "job.toml"),
        ("job.toml", "'output.path'", "nodir", "does not exist"),
        _job(output__path="nodir/ens.h5"),
    ),
    Case(
        "out-folder-missing",
        ("sample", "hmc.toml", "--out", "nodir/x.h5"),
        ("hmc.toml", "'output.path'", "nodir", "does not exist"),
        _job("hmc", "hmc.toml"),
    ),
    Case(
        "out-is-a-folder",
        ("sample", "hmc.toml", "--out", "results"),
        ("hmc.toml", "'output.path'", "results", "folder"),
        _both(_job("hmc", "hmc.toml"), _mkdir("results")),
    ),
    Case(
        "sample-before-training",
        ("sample", "job.toml"),
        ("ens.model.pt", "no trained model", "latflow train job.toml"),
        _job(),
    ),
    Case(
        "sample-before-training-with-out",
        ("sample", "job.toml", "--set", "train.steps=5", "--out", "other.h5"),
        ("other.model.pt", "no trained model", "with: latflow train job.toml --set train.steps=5 --out other.h5"),
        _job(),
    ),
    Case(
        "force-over-a-text-file",
        ("sample", "hmc.toml", "--force", "--out", "notes.txt"),
        ("notes.txt", "--force", "not a latflow ensemble", "not an HDF5 file"),
        _both(_job("hmc", "hmc.toml"), _text("notes.txt", "my notes\n")),
    ),
    Case(
        "force-over-foreign-hdf5",
        ("run", "hmc.toml", "--force", "--out", "plain.h5"),
        ("plain.h5", "--force", "not a latflow ensemble"),
        _both(_job("hmc", "hmc.toml"), _copy("plain.h5")),
    ),
    Case(
        "force-over-a-text-model",
        ("train", "job.toml", "--force", "--set", "output.model=notes.txt"),
        ("notes.txt", "--force", "not a latflow model checkpoint", "'output.model'"),
        _both(_job(), _text("notes.txt", "my notes\n")),
    ),
    Case(
        "resume-sample-without-ensemble",
        ("sample", "hmc.toml", "--resume"),
        ("hmc.h5", "nothing to resume", "without --resume"),
        _job("hmc", "hmc.toml"),
    ),
    Case(
        "resume-run-without-anything",
        ("run", "job.toml", "--resume"),
        ("ens.h5", "nothing to resume", "ens.model.pt", "without --resume"),
        _job(),
    ),
    Case(
        "resume-train-without-model",
        ("train", "job.toml", "--resume"),
        ("ens.model.pt", "nothing to resume", "without --resume"),
        _job(),
    ),
    Case(
        "resume-with-other-save-every",
        ("sample", "hmc.toml", "--resume", "--set", "output.save_every=5"),
        ("hmc.h5", "cannot resume", "storage", "save_every"),
        _both(
            _job("hmc", "hmc.toml", sampler__n_samples=8, sampler__n_tune=2, sampler__commit_every=2), _copy("hmc.h5")
        ),
    ),
    Case(
        "model-not-a-checkpoint",
        ("sample", "job.toml"),
        ("junk.pt", "checkpoint"),
        _both(_job(output__model="junk.pt"), _text("junk.pt", "not a checkpoint")),
    ),
    Case(
        "resume-with-other-model",
        ("train", "job.toml", "--resume", "--set", "model.hidden=[8]"),
        ("ens.model.pt", "different model", "job.toml"),
        _both(_job(), TRAINED),
    ),
    Case(
        "resume-with-other-coupling",
        ("sample", "hmc.toml", "--resume", "--set", "theory.lam=0.5"),
        ("hmc.h5", "cannot resume", "couplings"),
        _both(_job("hmc", "hmc.toml"), _copy("hmc.h5")),
    ),
    # --- analyze / verify ----------------------------------------------------------------------
    Case("analyze-missing-file", ("analyze", "nope.h5"), ("nope.h5", "no such file")),
    Case("verify-missing-file", ("verify", "nope.h5"), ("nope.h5", "no such file")),
    Case("analyze-not-hdf5", ("analyze", "job.toml"), ("job.toml", "not an HDF5 file"), _job()),
    Case("verify-not-hdf5", ("verify", "job.toml"), ("job.toml", "not an HDF5 file"), _job()),
    Case("analyze-directory", ("analyze", "results"), ("results", "directory"), _mkdir("results")),
    Case("verify-directory", ("verify", "results"), ("results", "directory"), _mkdir("results")),
    Case(
        "analyze-foreign-hdf5",
        ("analyze", "plain.h5"),
        ("plain.h5", "not a latflow ensemble", "format"),
        _copy("plain.h5"),
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, latflow_cli, make_job) -> Files:
    """A trained model, its ensemble, an HMC ensemble and a foreign HDF5 file, made once."""
    root = tmp_path_factory.mktemp("bad-input-files")
    make_job(root, "flow", {"sampler.n_samples": 40, "sampler.commit_every": 20})
    make_job(root, "hmc", {"sampler.n_samples": 4, "sampler.n_tune": 2, "sampler.commit_every": 2}, "hmc.toml")
    for args in (("train", "job.toml"), ("sample", "job.toml"), ("sample", "hmc.toml")):
        r = latflow_cli.run(args, root)
        assert r.returncode == 0, str(r)
    with h5py.File(root / "plain.h5", "w") as f:
        f["x"] = np.arange(3)
    return Files(root, make_job)


def test_there_are_many_kinds_of_bad_input():
    assert len(CASES) >= 12
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, files: Files, latflow_cli, tmp_path: Path, dir_snapshot):
    reason = case.skip()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    work.mkdir()
    case.setup(work, files)
    before = dir_snapshot(work)
    r = latflow_cli.run(case.args, work, timeout=120)
    after = dir_snapshot(work)
    if case.id == "unreadable-job-file":
        os.chmod(work / "job.toml", 0o600)
    _check_error(r, case.expect)
    assert after == before, f"files changed:\nbefore {before}\nafter  {after}\n{r}"


def _check_error(r, expect) -> None:
    assert "Traceback" not in r.stderr + r.stdout, str(r)
    assert r.returncode == 2, str(r)
    assert r.stdout == "", str(r)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and r.stderr.endswith("\n"), f"stderr is not one line:\n{r}"
    line = lines[0]
    assert line.startswith("latflow: error: "), line
    missing = [s for s in expect if s not in line]
    assert not missing, f"{missing} not in the error line {line!r}"


def test_existing_outputs_stay_byte_identical(files: Files, latflow_cli, tmp_path: Path):
    """`sample`/`run`/`train` over existing outputs leave ensemble and model bit for bit as they were."""
    files.job(tmp_path)
    files.copy(tmp_path, "ens.h5", "ens.model.pt")
    ens, model = (tmp_path / "ens.h5").read_bytes(), (tmp_path / "ens.model.pt").read_bytes()
    for args in (
        ("sample", "job.toml"),
        ("run", "job.toml"),
        ("train", "job.toml"),
        ("sample", "job.toml", "--set", "sampler.n_samples=10"),
    ):
        r = latflow_cli.run(args, tmp_path)
        _check_error(r, ("exists", "--resume", "--force"))
        assert (tmp_path / "ens.h5").read_bytes() == ens
        assert (tmp_path / "ens.model.pt").read_bytes() == model


def test_bad_input_through_a_fresh_interpreter(tmp_path: Path, make_job, dir_snapshot):
    """The real entry point (`python -m latflow.jobs.cli`), not a forked one, behaves the same."""
    make_job(tmp_path, "flow", {"train.steps": 1.5})
    before = dir_snapshot(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [sys.executable, "-m", "latflow.jobs.cli", "train", "job.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in p.stderr
    assert p.returncode == 2, p.stderr
    assert p.stderr.splitlines() == [p.stderr.strip()]
    assert p.stderr.startswith("latflow: error: job.toml: 'train.steps' = 1.5: expected an integer")
    assert dir_snapshot(tmp_path) == before
