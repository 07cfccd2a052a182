"""Schwinger observables that scale: exact (dense) on small volumes, stochastic (CG) above.

- below ``dense_max_volume`` the observables are the exact dense ones; above it the condensate is the
  Z2-noise estimate, ``action`` / ``fermion_logdet`` give way to ``gauge_action``, and the ensemble's
  metadata says which estimator each observable uses;
- the stochastic condensate is unbiased: over 300 configurations (noise seeded by each
  configuration), the mean difference to the exact dense trace is zero within 3 sigma;
- it is a fixed function of the configuration (a repeated state measures the same) and does not
  depend on how a batch is chunked;
- a ``latflow run`` of a pf-hmc job at L = 32 measures its observables in bounded memory: peak RSS of
  the process at most 250 MiB above that of a process that only imports latflow (the dense
  observables of one 32x32 configuration alone need ~200 MiB: ``D``, its LU factors and the inverse,
  2048 x 2048 complex128 each; a commit block of 8 needs ~1.5 GiB).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from conftest import job_toml, stat_seed

from latflow.ensemble import EnsembleReader
from latflow.lattice import Lattice
from latflow.samplers import HMC
from latflow.theories.schwinger import DENSE_MAX_VOLUME, SchwingerModel, SchwingerParams

F64 = torch.float64


def gauge_configs(shape: tuple[int, int], n: int, seed: int) -> torch.Tensor:
    """``n`` link configurations ``[n, 2, *shape]`` from short pure-gauge HMC chains at beta = 2."""
    theory = SchwingerModel(SchwingerParams(2.0, 0.0), Lattice(shape))
    g = torch.Generator().manual_seed(seed)
    hmc = HMC(
        theory.gauge_action,
        0.3 * torch.randn((n, 2, *shape), generator=g, dtype=F64),
        step_size=0.2,
        n_steps=5,
        generator=g,
        force=theory.gauge_force,
    )
    hmc.run(10)
    return hmc.x


def test_dense_below_and_stochastic_above_the_stated_volume() -> None:
    assert DENSE_MAX_VOLUME == 100
    small = SchwingerModel(SchwingerParams(2.0, 0.2), Lattice((10, 10)))
    large = SchwingerModel(SchwingerParams(2.0, 0.2), Lattice((12, 10)))
    assert small.dense_observables and not large.dense_observables
    x_small, x_large = gauge_configs((10, 10), 2, 1), gauge_configs((12, 10), 2, 1)
    obs_small, obs_large = small.observables(x_small), large.observables(x_large)
    assert set(obs_small) == set(small.observable_info()) >= {"action", "fermion_logdet", "chiral_condensate"}
    assert (
        set(obs_large)
        == set(large.observable_info())
        == {"gauge_action", "plaquette", "topological_charge", "topological_charge_sq", "chiral_condensate"}
    )
    torch.testing.assert_close(obs_small["chiral_condensate"], small.chiral_condensate(x_small), rtol=0, atol=1e-12)
    torch.testing.assert_close(obs_large["gauge_action"], large.gauge_action(x_large), rtol=0, atol=1e-10)
    settings = large.measurement_settings()
    assert settings["estimator"] == "stochastic" and settings["n_noise"] == large.n_noise
    assert "stochastic" in settings["observables"]["chiral_condensate"]
    assert small.measurement_settings()["estimator"] == "exact"


def test_stochastic_condensate_is_a_function_of_the_configuration() -> None:
    theory = SchwingerModel(SchwingerParams(2.0, 0.2), Lattice((6, 6)), dense_max_volume=0, chunk_size=3)
    x = gauge_configs((6, 6), 7, 2)
    whole = theory.observables(x)["chiral_condensate"]
    one_by_one = torch.cat([theory.observables(x[i : i + 1])["chiral_condensate"] for i in range(7)])
    torch.testing.assert_close(whole, one_by_one, rtol=0, atol=1e-12)
    repeated = theory.observables(x[[0, 0, 1]])["chiral_condensate"]
    assert repeated[0] == repeated[1] and repeated[0] != repeated[2]
    assert theory.observables(x[:0])["chiral_condensate"].shape == (0,)


@pytest.mark.statistical
def test_stochastic_condensate_is_unbiased(record_z) -> None:
    """300 configurations on 6x6 (kappa = 0.24), one Z2 vector each: <stochastic - exact> = 0."""
    shape = (6, 6)
    x = gauge_configs(shape, 300, stat_seed(3))
    exact = SchwingerModel(SchwingerParams(2.0, 0.24), Lattice(shape)).chiral_condensate(x)
    noisy = SchwingerModel(SchwingerParams(2.0, 0.24), Lattice(shape), dense_max_volume=0, n_noise=1)
    d = (noisy.observables(x)["chiral_condensate"] - exact).numpy()
    z = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    print(f"stochastic - exact condensate: {d.mean():+.5f} +- {d.std(ddof=1) / math.sqrt(len(d)):.5f}, z = {z:+.2f}")
    record_z("chiral_condensate", z)
    assert abs(z) < 3, z
    assert d.std() > 1e-3  # the estimate is noisy: the check has teeth


PEAK_RSS = textwrap.dedent(
    """
    import json, sys
    from latflow.jobs import cli
    rc = cli.main(sys.argv[1:]) if len(sys.argv) > 1 else 0

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    print(json.dumps({"rc": rc, "peak_mib": vm("VmHWM:")}))
    """
)


def peak_rss(args: list[str], cwd) -> dict:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_schwinger_job_at_L32_runs_in_bounded_memory(tmp_path) -> None:
    job = {
        "theory": {"name": "schwinger", "beta": 2.0, "kappa": 0.2},
        "lattice": {"shape": [32, 32]},
        "sampler": {
            "kind": "pf-hmc",
            "n_samples": 4,
            "thermalization": 0,
            "n_chains": 2,
            "step_size": 0.25,
            "n_steps": 2,
            "tune": False,
            "even_odd": True,
            "cg_tol": 1e-8,
            "commit_every": 4,
        },
        "output": {"path": "l32.h5"},
        "run": {"seed": 5},
    }
    (tmp_path / "job.toml").write_text(job_toml(job), encoding="utf-8")
    base = peak_rss([], tmp_path)["peak_mib"]
    run = peak_rss(["run", "job.toml"], tmp_path)
    print(f"peak RSS: import only {base:.0f} MiB, L = 32 pf-hmc job {run['peak_mib']:.0f} MiB")
    assert run["rc"] == 0
    with EnsembleReader(tmp_path / "l32.h5") as r:
        sigma = r.read("observables/chiral_condensate")
        measurement = r.meta.sampler["measurement"]
    assert measurement["estimator"] == "stochastic" and sigma.shape == (8,) and np.all(np.isfinite(sigma))
    with h5py.File(tmp_path / "l32.h5", "r") as f:  # and on the dataset itself
        attrs = dict(f["observables/chiral_condensate"].attrs)
    assert attrs.get("estimator") == "stochastic" and int(attrs.get("n_noise")) == 4, attrs
    assert run["peak_mib"] - base < 250, (base, run["peak_mib"])
