"""The pure SU(N) gauge action's analytic force (``SUNGaugeAction.force``) against the autograd force HMC used before.

``force`` is the compiled fused kernel on CPU where it applies (N <= 3, no autograd graph), the torch staple
sum otherwise (``force_reference``); both must equal ``SUN.force(action, u)`` (autograd, the left Lie derivative
of :mod:`latflow.manifolds`) to rounding, and HMC built by the job runner must pick ``force`` up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latflow.gauge_kernels import sun_wilson_force
from latflow.jobs import runner
from latflow.jobs.config import load_job
from latflow.jobs.runner import build_theory
from latflow.lattice import Lattice
from latflow.mpi import SerialComm
from latflow.samplers import HMC
from latflow.theories.su3 import SUNGaugeAction, SUNParams

SHAPES = [(4, 4), (6, 4), (4, 4, 4, 4), (2, 4, 2, 6)]


def _theory_and_links(n: int, shape: tuple[int, ...], seed: int = 7) -> tuple[SUNGaugeAction, torch.Tensor]:
    theory = SUNGaugeAction(SUNParams(2.3, n), Lattice(shape))
    u = theory.initial_field(3, torch.Generator().manual_seed(seed), "hot")  # complex128 Haar links
    return theory, u


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n", [2, 3])
def test_force_equals_the_autograd_force(n: int, shape: tuple[int, ...]) -> None:
    """``force`` and ``force_reference`` equal ``SUN.force(action)`` to 1e-12 in complex128, SU(2)/SU(3), d = 2, 4."""
    theory, u = _theory_and_links(n, shape)
    auto = theory.manifold.force(theory.action, u)
    assert float(auto.abs().max()) > 0.1  # a hot start: forces of order one, so 1e-12 is a relative bound too
    torch.testing.assert_close(theory.force(u), auto, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(theory.force_reference(u), auto, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 4), (4, 2, 2, 4)], ids=lambda s: "x".join(map(str, s)))
def test_force_uses_the_compiled_kernel_where_it_applies(shape: tuple[int, ...]) -> None:
    """On CPU without autograd: the kernel's force, bit for bit; with a graph: the differentiable torch one."""
    theory, u = _theory_and_links(3, shape)
    fused = sun_wilson_force(u, theory.beta)
    if fused is None:
        pytest.skip("the gauge_force kernel is unavailable here (no compiler or LATFLOW_KERNELS=off)")
    assert torch.equal(theory.force(u), fused)
    ug = u.clone().requires_grad_(True)
    f = theory.force(ug)
    assert f.requires_grad
    torch.testing.assert_close(f.detach(), fused, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n", "shape"), [(4, (4, 4)), (3, (1, 4)), (2, (3, 1, 2, 2))])
def test_force_without_kernel_cases(n: int, shape: tuple[int, ...]) -> None:
    """N = 4 (not compiled) and extent-1 lattices (the staples contain the link) still give the autograd force."""
    theory, u = _theory_and_links(n, shape)
    torch.testing.assert_close(theory.force(u), theory.manifold.force(theory.action, u), rtol=1e-12, atol=1e-12)


def test_complex64_force_is_close() -> None:
    """complex64 links give a complex64 force within single-precision rounding of the double one."""
    theory, u = _theory_and_links(3, (4, 4, 4, 4))
    f32 = theory.force(u.to(torch.complex64))
    assert f32.dtype == torch.complex64
    torch.testing.assert_close(f32.to(torch.complex128), theory.force(u), rtol=0, atol=2e-6)


def test_runner_hmc_uses_the_theory_force(tmp_path: Path) -> None:
    """The job runner's HMC for a pure SU(N) job takes ``theory.force`` (not autograd through ``action``)."""
    job_file = tmp_path / "su3.toml"
    job_file.write_text(
        '[theory]\nname = "su3"\nbeta = 4.0\n[lattice]\nshape = [4, 4]\n[sampler]\nkind = "hmc"\nn_samples = 4\n'
        '[output]\npath = "su3.h5"\n',
        encoding="utf-8",
    )
    job = load_job(job_file)
    theory = build_theory(job)
    hmc = runner._make_sampler(job, theory, None, SerialComm(), torch.device("cpu"))
    assert isinstance(hmc, HMC)
    assert hmc.force == theory.force
    x = hmc.x.clone()
    torch.testing.assert_close(hmc.force(x), theory.manifold.force(theory.action, x), rtol=1e-12, atol=1e-12)
