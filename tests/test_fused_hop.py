"""The fused Wilson hopping kernel and the table hop against the torch reference; even/odd on half lattices."""

import ctypes

import pytest
import torch

from latflow.fermions import EvenOddWilson, WilsonDirac
from latflow.fermions.dense import dense_matrix
from latflow.fermions.hopping import _library, hop_tables, parity_sites, table_hop
from latflow.lattice import Lattice

CASES = [  # (lattice shape, colours)
    ((4, 6), 1),
    ((4, 6), 2),
    ((4, 6), 3),
    ((4, 2, 4, 6), 1),
    ((4, 2, 4, 6), 3),
    ((4, 6, 2), 1),  # d = 3: generic (non-unrolled) kernel path
]
RTOL = {torch.complex128: 1e-13, torch.complex64: 1e-5}

needs_kernel = pytest.mark.skipif(_library() is None, reason="compiled wilson_hop kernel unavailable")


def _fields(op: WilsonDirac, batch: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    U = torch.randn((batch, *op.link_shape), generator=g, dtype=dtype)
    psi = torch.randn((batch, *op.field_shape), generator=g, dtype=dtype)
    return U, psi


def _unitary(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random unitary matrices ``[*shape]`` (last two axes square), complex128."""
    return torch.linalg.qr(torch.randn(shape, generator=g, dtype=torch.complex128))[0].contiguous()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@needs_kernel
@pytest.mark.parametrize("shape,n_colors", CASES)
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("antiperiodic", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_kernel_matches_torch_reference(shape, n_colors, dtype, antiperiodic, batch):
    kw = dict(n_colors=n_colors, antiperiodic_time=antiperiodic)
    fused = WilsonDirac(Lattice(shape), 0.137, backend="kernel", **kw)
    ref = WilsonDirac(Lattice(shape), 0.137, backend="torch", **kw)
    U, psi = _fields(ref, batch, dtype)
    for name in ("hop", "apply", "apply_dagger", "apply_normal"):
        out = getattr(fused, name)(U, psi)
        assert out.shape == psi.shape and out.dtype == dtype
        assert _rel(out, getattr(ref, name)(U, psi)) < RTOL[dtype], name
    assert _rel(fused.hop(U, psi, dagger=True), ref.hop(U, psi, dagger=True)) < RTOL[dtype]


@needs_kernel
@pytest.mark.parametrize("d,expected", [(2, (1, 2)), (4, (1, 2)), (3, (0, 0))])
def test_unrolled_kernel_path_taken_for_builtin_gammas(d, expected):
    op = WilsonDirac(Lattice((2,) * d), 0.1)
    lib = _library()
    got = []
    for dagger in (False, True):
        ints, coefs = op._term_tabs[dagger]
        got.append(
            lib.latflow_wilson_hop_variant(
                d, op.n_spin, ints.shape[0], ctypes.c_void_p(ints.data_ptr()), ctypes.c_void_p(coefs.data_ptr())
            )
        )
    assert tuple(got) == expected


def test_auto_backend_falls_back_to_torch():
    op = WilsonDirac(Lattice((4, 4)), 0.2, n_colors=3)
    ref = WilsonDirac(Lattice((4, 4)), 0.2, n_colors=3, backend="torch")
    U, psi = _fields(op, 2, torch.complex128)
    # a non-contiguous spinor and an autograd call both take the torch code
    psi_t = psi.transpose(1, 2).contiguous().transpose(1, 2)
    assert _rel(op.apply(U, psi_t), ref.apply(U, psi)) < 1e-13
    U_g = U.clone().requires_grad_(True)
    (op.apply(U_g, psi).abs() ** 2).sum().backward()
    assert U_g.grad is not None and torch.isfinite(U_g.grad).all()
    with pytest.raises(ValueError, match="backend must be one of"):
        WilsonDirac(Lattice((4, 4)), 0.2, backend="fast")


@pytest.mark.parametrize("shape,n_colors", [((4, 6), 1), ((4, 6), 3), ((4, 2, 4, 6), 3)])
def test_table_hop_torch_path_matches_reference_and_has_gradients(shape, n_colors):
    ref = WilsonDirac(Lattice(shape), 0.15, n_colors=n_colors, backend="torch")
    U, psi = _fields(ref, 2, torch.complex128, seed=1)
    tables = hop_tables(shape, "all")
    flat = psi.reshape(2, tables.n_out, *ref.field_shape[len(shape) :])
    for dagger in (False, True):
        out = table_hop(
            tables,
            ref._flat_terms[dagger],
            None,
            ref.flat_links(U),
            flat,
            scale=-ref.kappa,
            base=flat,
            n_spin=ref.n_spin,
            n_colors=n_colors,
            backend="torch",
        )
        expect = ref.apply_dagger(U, psi) if dagger else ref.apply(U, psi)
        assert _rel(out.reshape(psi.shape), expect) < 1e-13
    # autograd through the gather path equals autograd through the reference
    grads = []
    for use_table in (True, False):
        Ug = U.clone().requires_grad_(True)
        if use_table:
            out = table_hop(
                tables,
                ref._flat_terms[False],
                None,
                ref.flat_links(Ug),
                flat,
                n_spin=ref.n_spin,
                n_colors=n_colors,
                backend="torch",
            ).reshape(psi.shape)
        else:
            out = ref.hop(Ug, psi)
        (out.abs() ** 2).sum().backward()
        grads.append(Ug.grad)
    assert _rel(grads[0], grads[1]) < 1e-12


def test_parity_packing_order():
    even = parity_sites((2, 4), "even")
    assert even.tolist() == [0, 2, 5, 7]
    assert parity_sites((2, 4), "odd").tolist() == [1, 3, 4, 6]
    with pytest.raises(ValueError, match="even extents"):
        parity_sites((3, 4), "even")


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("shape,n_colors", [((4, 6), 1), ((4, 6), 3), ((4, 2, 4, 6), 1), ((4, 2, 2, 2), 3)])
@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
def test_packed_schur_operator_matches_full_lattice_one(backend, shape, n_colors, dtype):
    dirac = WilsonDirac(Lattice(shape), 0.14, n_colors=n_colors, backend=backend)
    eo = EvenOddWilson(dirac)
    U, psi = _fields(dirac, 3, dtype, seed=2)
    x = eo.pack(psi)
    assert x.shape == (3, *eo.packed_shape)
    full = eo.unpack(x)
    assert torch.equal(full, eo.project_even(psi))
    assert torch.equal(eo.unpack(x, eo.pack_odd(psi)), psi)
    tol = RTOL[dtype] * 10
    assert _rel(eo.apply_packed(U, x), eo.pack(eo.apply(U, full))) < tol
    assert _rel(eo.apply_dagger_packed(U, x), eo.pack(eo.apply_dagger(U, full))) < tol
    assert _rel(eo.apply_normal_packed(U, x), eo.pack(eo.apply_normal(U, full))) < tol
    assert _rel(eo.source_packed(U, psi), eo.pack(eo.source(U, psi))) < tol
    assert _rel(eo.reconstruct_packed(U, x, psi), eo.reconstruct(U, full, psi)) < tol
    with pytest.raises(ValueError, match="packed even-site spinors"):
        eo.apply_packed(U, psi)


@pytest.mark.parametrize("shape,n_colors", [((4, 4), 1), ((2, 2, 2, 2), 3)])
def test_packed_schur_determinant_equals_full_determinant(shape, n_colors):
    dirac = WilsonDirac(Lattice(shape), 0.21, n_colors=n_colors)
    eo = EvenOddWilson(dirac)
    g = torch.Generator().manual_seed(3)
    if n_colors == 1:
        theta = torch.randn((2, *dirac.link_shape), generator=g, dtype=torch.float64)
        U = torch.polar(torch.ones_like(theta), theta)
    else:
        U = _unitary((2, *dirac.link_shape), g)
    m_full = dense_matrix(dirac.apply, U, dirac.field_shape)
    m_hat = dense_matrix(eo.apply_packed, U, eo.packed_shape)
    assert m_hat.shape[-1] * 2 == m_full.shape[-1]
    sign_f, log_f = torch.linalg.slogdet(m_full)
    sign_h, log_h = torch.linalg.slogdet(m_hat)
    assert torch.allclose(log_f, log_h, rtol=0, atol=1e-10)
    assert torch.allclose(sign_f, sign_h, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("method", ["cgnr", "bicgstab"])
def test_packed_solve_solves_full_system(backend, method):
    dirac = WilsonDirac(Lattice((8, 6)), 0.2, n_colors=3, backend=backend)
    eo = EvenOddWilson(dirac)
    U = _unitary((2, *dirac.link_shape), torch.Generator().manual_seed(4))
    b = dirac.gaussian(2, torch.Generator().manual_seed(5))
    res = eo.solve(U, b, tol=1e-10, method=method)
    assert res.x.shape == b.shape
    r = (b - WilsonDirac(Lattice((8, 6)), 0.2, n_colors=3, backend="torch").apply(U, res.x)).flatten(1)
    assert float((r.norm(dim=1) / b.flatten(1).norm(dim=1)).max()) < 1e-9
    assert bool((res.residual < 1e-10).all())


@needs_kernel
def test_two_threads_give_the_same_numbers_and_torch_threads_survive():
    dirac = WilsonDirac(Lattice((8, 8, 4, 4)), 0.12, n_colors=3, backend="kernel")
    eo = EvenOddWilson(dirac)
    U, psi = _fields(dirac, 2, torch.complex128, seed=6)
    a = torch.randn(200, 200, dtype=torch.float64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        before = a @ a
        out2, eo2 = dirac.apply(U, psi), eo.apply_normal_packed(U, eo.pack(psi))
        after = a @ a
        torch.set_num_threads(1)
        out1, eo1 = dirac.apply(U, psi), eo.apply_normal_packed(U, eo.pack(psi))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out1, out2) and torch.equal(eo1, eo2)
    assert torch.equal(before, after)


def test_kernels_off_falls_back_to_torch(monkeypatch):
    monkeypatch.setenv("LATFLOW_KERNELS", "off")
    op = WilsonDirac(Lattice((4, 6)), 0.13, n_colors=3)
    ref = WilsonDirac(Lattice((4, 6)), 0.13, n_colors=3, backend="torch")
    U, psi = _fields(op, 2, torch.complex128, seed=7)
    assert _rel(op.apply(U, psi), ref.apply(U, psi)) < 1e-13
    eo = EvenOddWilson(op)
    x = eo.pack(psi)
    assert _rel(eo.apply_normal_packed(U, x), eo.pack(eo.apply_normal(U, eo.unpack(x)))) < 1e-13
    with pytest.raises(RuntimeError, match="backend='kernel'"):
        WilsonDirac(Lattice((4, 6)), 0.13, n_colors=3, backend="kernel").apply(U, psi)
