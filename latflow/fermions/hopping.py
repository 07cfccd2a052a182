"""The Wilson hopping term on site-index tables: one fused compiled kernel, and a torch gather fallback.

For output sites ``x_i`` (all sites, or the even or the odd sites of the lattice) and a source field
stored in its own packing (all sites, or the sites of one parity), one call computes

``out[b, i] = base[b, i] + scale * sum_mu [ P^-_mu U_mu(x_i) src[b, fwd[i, mu]]
+ P^+_mu U_mu(x_i - mu)^dagger src[b, bwd[i, mu]] ]``

with ``P^-+_mu = (1 -+ gamma_mu)`` for ``H`` (signs flipped for ``H^dagger``), given as the
half-spinor projection/reconstruction terms of :attr:`WilsonDirac._flat_terms
<latflow.fermions.wilson.WilsonDirac>`. ``U`` are the prepared forward links (time-boundary sign
folded in, :meth:`WilsonDirac.prepared_links`); the backward hop takes their adjoint, so each
link is read once.

Packings. A packed field of parity ``p`` lists the sites of parity ``p`` (``sum_mu x_mu mod 2``)
in increasing full-lattice flat (row-major) index. :class:`HopTables` (built once per lattice
shape and output parity, cached) holds ``out_site [n_out]`` (full flat index of output site
``i``), ``fwd, bwd [n_out, d]`` (index of ``x_i +- mu`` in the source packing) and
``bwd_link [n_out, d]`` (full flat index of ``x_i - mu``). The source packing is all sites for
``out_parity = "all"`` and the opposite parity otherwise (``H`` connects opposite parities only).

Shapes: fields ``[B, n_sites, Ns]`` (U(1)) or ``[B, n_sites, Ns, N]`` (SU(N)); links
``[B, d, V]`` (U(1)) or ``[B, d, V, N, N]``.

Backends. :func:`table_hop` calls the compiled kernel ``latflow/kernels/wilson_hop.cpp`` when
:func:`kernel_usable` allows it (CPU, contiguous complex64/complex128, no autograd, ``Ns`` in
{2, 4}, ``N`` in {1, 2, 3}, kernel built, ``LATFLOW_KERNELS`` not ``off``) and otherwise the
torch path (``index_select`` gathers; any device, autograd). Both give the same numbers to
rounding. The kernel runs OpenMP over sites with ``torch.get_num_threads()`` threads.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence

import torch

from latflow.kernels import load

__all__ = [
    "HopTables",
    "hop_tables",
    "parity_sites",
    "term_tables",
    "kernel_usable",
    "table_hop",
    "kernel_hop",
    "BACKENDS",
]

BACKENDS = ("auto", "torch", "kernel")
PARITIES = ("all", "even", "odd")

# (mu, backward, projection terms, reconstruction terms); each term ((spin, coefficient), ...)
FlatTerm = tuple[int, bool, tuple[tuple[int, complex], ...], tuple[tuple[int, complex], ...]]

_KERNEL = "wilson_hop"
_DTYPES = {torch.complex64: 4, torch.complex128: 8}


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else ``ValueError``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


def parity_sites(shape: Sequence[int], parity: str) -> torch.Tensor:
    """Full-lattice flat indices (int64 ``[n]``, increasing) of the sites of ``parity``.

    ``parity`` is ``"all"``, ``"even"`` or ``"odd"``; even/odd need even extents.
    """
    shape = tuple(int(n) for n in shape)
    if parity not in PARITIES:
        raise ValueError(f"parity must be one of {', '.join(map(repr, PARITIES))}, got {parity!r}")
    volume = math.prod(shape)
    if parity == "all":
        return torch.arange(volume)
    if any(n % 2 for n in shape):
        raise ValueError(f"even/odd site packing needs even extents, got lattice shape {list(shape)}")
    coords = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    par = sum(coords).reshape(-1) % 2
    return torch.nonzero(par == (0 if parity == "even" else 1)).squeeze(1)


class HopTables:
    """Site-index tables of one hop: output sites of ``out_parity``, source packed by ``src_parity``.

    Attributes
    ----------
    shape : tuple[int, ...]
        Lattice extents ``(L0, ..., L{d-1})``.
    out_parity, src_parity : str
        ``"all"``/``"all"``, ``"even"``/``"odd"`` or ``"odd"``/``"even"``.
    out_site : torch.Tensor
        int64 ``[n_out]``: full flat index of each output site.
    fwd, bwd : torch.Tensor
        int64 ``[n_out, d]``: index of ``x_i + mu`` / ``x_i - mu`` in the source packing.
    bwd_link : torch.Tensor
        int64 ``[n_out, d]``: full flat index of ``x_i - mu``.
    n_out, n_src, volume : int
    """

    def __init__(self, shape: Sequence[int], out_parity: str = "all") -> None:
        self.shape = tuple(int(n) for n in shape)
        d = len(self.shape)
        self.out_parity = out_parity
        self.src_parity = {"all": "all", "even": "odd", "odd": "even"}[out_parity]
        self.volume = math.prod(self.shape)
        self.out_site = parity_sites(self.shape, out_parity)
        src_sites = parity_sites(self.shape, self.src_parity)
        position = torch.full((self.volume,), -1, dtype=torch.int64)
        position[src_sites] = torch.arange(len(src_sites))
        grid = torch.arange(self.volume).reshape(self.shape)
        fwd_full = torch.stack([torch.roll(grid, -1, mu).reshape(-1) for mu in range(d)], dim=1)
        bwd_full = torch.stack([torch.roll(grid, 1, mu).reshape(-1) for mu in range(d)], dim=1)
        self.bwd_link = bwd_full[self.out_site].contiguous()
        self.fwd = position[fwd_full[self.out_site]].contiguous()
        self.bwd = position[self.bwd_link].contiguous()
        if bool((self.fwd < 0).any()) or bool((self.bwd < 0).any()):  # pragma: no cover - parity bug guard
            raise RuntimeError(f"hop tables for {list(self.shape)}: a neighbour is missing from the source packing")
        self.n_out = len(self.out_site)
        self.n_src = len(src_sites)
        self._int32 = tuple(t.to(torch.int32).contiguous() for t in (self.out_site, self.fwd, self.bwd, self.bwd_link))
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def __repr__(self) -> str:
        return f"HopTables({list(self.shape)}, out={self.out_parity}, src={self.src_parity})"

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(out_site, fwd, bwd, bwd_link)`` as int64 tensors on ``device`` (cached)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.out_site, self.fwd, self.bwd, self.bwd_link
        tabs = self._on_device.get(device)
        if tabs is None:
            tabs = tuple(t.to(device) for t in (self.out_site, self.fwd, self.bwd, self.bwd_link))
            self._on_device[device] = tabs
        return tabs  # type: ignore[return-value]


@functools.lru_cache(maxsize=32)
def hop_tables(shape: tuple[int, ...], out_parity: str = "all") -> HopTables:
    """Cached :class:`HopTables` for a lattice ``shape`` and output parity ``"all"``, ``"even"``, ``"odd"``."""
    if out_parity not in PARITIES:
        raise ValueError(f"out_parity must be one of {', '.join(map(repr, PARITIES))}, got {out_parity!r}")
    return HopTables(tuple(shape), out_parity)


def term_tables(terms: Sequence[FlatTerm]) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel form of half-spinor terms: int32 ``[K, 8]`` (mu, backward, n_proj, p0, p1, n_recon, r0, r1)
    and float64 ``[K, 8]`` (proj coefficients p0, p1 and recon coefficients r0, r1 as re, im pairs)."""
    ints = torch.zeros((len(terms), 8), dtype=torch.int32)
    coefs = torch.zeros((len(terms), 8), dtype=torch.float64)
    for k, (mu, backward, proj, recon) in enumerate(terms):
        if not (1 <= len(proj) <= 2 and 1 <= len(recon) <= 2):
            raise ValueError(f"half-spinor term {k} has {len(proj)} projection / {len(recon)} reconstruction entries")
        p = [*proj, (0, 0.0)][:2]
        r = [*recon, (0, 0.0)][:2]
        ints[k] = torch.tensor([mu, int(backward), len(proj), p[0][0], p[1][0], len(recon), r[0][0], r[1][0]])
        cs = [complex(c) for _, c in (*p, *r)]
        coefs[k] = torch.tensor([v for c in cs for v in (c.real, c.imag)], dtype=torch.float64)
    return ints.contiguous(), coefs.contiguous()


def _library() -> ctypes.CDLL | None:
    lib = load(_KERNEL)
    if lib is not None and not getattr(lib, "_latflow_typed", False):
        i64, i32p, vp = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p
        fn = lib.latflow_wilson_hop
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            i64,
            i64,
            i64,
            i64,
            i32p,
            i32p,
            i32p,
            i32p,
            ctypes.c_int,
            vp,
            vp,
            vp,
            vp,
            vp,
            vp,
            ctypes.c_double,
            ctypes.c_int,
        ]
        fn = lib.latflow_wilson_schur_normal
        fn.restype = ctypes.c_int
        fn.argtypes = [
            *(ctypes.c_int,) * 4,
            i64,
            i64,
            i64,
            *(i32p,) * 8,
            ctypes.c_int,
            *(vp,) * 4,
            *(vp,) * 5,
            ctypes.c_double,
            ctypes.c_int,
        ]
        lib._latflow_typed = True
    return lib


def kernel_usable(*tensors: torch.Tensor | None, n_spin: int, n_colors: int) -> bool:
    """Whether the compiled kernel may take this call (cheap checks; loads the kernel on first use).

    All given tensors must be CPU, contiguous, of one dtype complex64 or complex128, and not need
    autograd; ``n_spin`` in {2, 4}, ``n_colors`` in {1, 2, 3}.
    """
    if n_spin not in (2, 4) or n_colors not in (1, 2, 3):
        return False
    ts = [t for t in tensors if t is not None]
    dtype = ts[0].dtype
    if dtype not in _DTYPES:
        return False
    grad = torch.is_grad_enabled()
    for t in ts:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or (grad and t.requires_grad):
            return False
        if t.is_conj() or t.is_neg():
            return False
    return _library() is not None


def kernel_hop(
    tables: HopTables,
    ints: torch.Tensor,
    coefs: torch.Tensor,
    uf: torch.Tensor,
    src: torch.Tensor,
    scale: float,
    base: torch.Tensor | None,
    n_spin: int,
    n_colors: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base + scale * H src`` by the compiled kernel; the caller has checked :func:`kernel_usable`.

    ``ints, coefs`` are :func:`term_tables` of the terms; other arguments as in :func:`table_hop`.
    ``out``: optional contiguous ``[B, n_out, Ns(, N)]`` tensor of the source's dtype to write into
    (must not overlap ``src`` or ``base``); a new tensor otherwise.
    """
    lib = _library()
    batch = src.shape[0]
    shape = (batch, tables.n_out, *src.shape[2:])
    if out is None:
        out = torch.empty(shape, dtype=src.dtype)
    elif tuple(out.shape) != shape or out.dtype != src.dtype or not out.is_contiguous() or out.device != src.device:
        raise ValueError(f"out must be contiguous {src.dtype} {list(shape)}, got {out.dtype} {list(out.shape)}")
    out_site, fwd, bwd, bwd_link = tables._int32
    err = lib.latflow_wilson_hop(
        _DTYPES[src.dtype],
        n_colors,
        n_spin,
        len(tables.shape),
        batch,
        tables.n_out,
        tables.n_src,
        tables.volume,
        out_site.data_ptr(),
        fwd.data_ptr(),
        bwd.data_ptr(),
        bwd_link.data_ptr(),
        ints.shape[0],
        ints.data_ptr(),
        coefs.data_ptr(),
        uf.data_ptr(),
        src.data_ptr(),
        None if base is None else base.data_ptr(),
        out.data_ptr(),
        float(scale),
        torch.get_num_threads(),
    )
    if err:  # pragma: no cover - excluded by kernel_usable
        raise RuntimeError(f"wilson_hop kernel refused the call (code {err})")
    return out


def kernel_schur_normal(
    odd: HopTables,
    even: HopTables,
    h_tabs: tuple[torch.Tensor, torch.Tensor],
    hd_tabs: tuple[torch.Tensor, torch.Tensor],
    uf: torch.Tensor,
    src: torch.Tensor,
    kappa: float,
    n_spin: int,
    n_colors: int,
) -> torch.Tensor:
    """``M_hat^dagger M_hat src`` on packed even sites in one compiled call (four hops; the caller has checked
    :func:`kernel_usable`), ``M_hat = 1 - kappa^2 H_eo H_oe``.

    ``odd``, ``even``: :func:`hop_tables` with odd and even output sites; ``h_tabs``, ``hd_tabs``:
    :func:`term_tables` of ``H`` and ``H^dagger``; ``uf`` prepared links ``[B, d, V(, N, N)]``; ``src`` contiguous
    ``[B, V/2, Ns(, N)]``. Returns a new ``[B, V/2, Ns(, N)]`` tensor.
    """
    lib = _library()
    out = torch.empty_like(src)
    tmp_odd, tmp_even = torch.empty_like(src), torch.empty_like(src)
    o_site, o_fwd, o_bwd, o_link = odd._int32
    e_site, e_fwd, e_bwd, e_link = even._int32
    err = lib.latflow_wilson_schur_normal(
        _DTYPES[src.dtype],
        n_colors,
        n_spin,
        len(odd.shape),
        src.shape[0],
        odd.n_out,
        odd.volume,
        o_site.data_ptr(),
        o_fwd.data_ptr(),
        o_bwd.data_ptr(),
        o_link.data_ptr(),
        e_site.data_ptr(),
        e_fwd.data_ptr(),
        e_bwd.data_ptr(),
        e_link.data_ptr(),
        h_tabs[0].shape[0],
        h_tabs[0].data_ptr(),
        h_tabs[1].data_ptr(),
        hd_tabs[0].data_ptr(),
        hd_tabs[1].data_ptr(),
        uf.data_ptr(),
        src.data_ptr(),
        tmp_odd.data_ptr(),
        tmp_even.data_ptr(),
        out.data_ptr(),
        float(kappa) ** 2,
        torch.get_num_threads(),
    )
    if err:  # pragma: no cover - excluded by kernel_usable
        raise RuntimeError(f"wilson_hop kernel refused the Schur-complement call (code {err})")
    return out


def _torch_hop(
    tables: HopTables,
    terms: Sequence[FlatTerm],
    uf: torch.Tensor,
    src: torch.Tensor,
    scale: float,
    base: torch.Tensor | None,
    n_spin: int,
    n_colors: int,
) -> torch.Tensor:
    out_site, fwd, bwd, bwd_link = tables.indices(src.device)
    full_out = tables.out_parity == "all"
    acc: list[torch.Tensor | None] = [None] * n_spin
    gathered: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
    for mu, backward, proj, recon in terms:
        key = (mu, backward)
        if key not in gathered:
            s = src.index_select(1, (bwd if backward else fwd)[:, mu])
            links = uf[:, mu]
            if backward:
                links = links.index_select(1, bwd_link[:, mu])
                links = links.conj() if n_colors == 1 else links.conj().transpose(-1, -2)
            elif not full_out:
                links = links.index_select(1, out_site)
            gathered[key] = (s, links)
        s, links = gathered[key]
        h = None
        for spin, c in proj:
            term = s.select(2, spin) * c if c != 1 else s.select(2, spin)
            h = term if h is None else h + term
        y = h * links if n_colors == 1 else torch.matmul(links, h.unsqueeze(-1)).squeeze(-1)
        for spin, c in recon:
            term = y * c if c != 1 else y
            acc[spin] = term if acc[spin] is None else acc[spin] + term
    some = next(a for a in acc if a is not None)
    hop = torch.stack([a if a is not None else torch.zeros_like(some) for a in acc], dim=2)
    return hop * scale if base is None else torch.add(base, hop, alpha=scale)


def table_hop(
    tables: HopTables,
    terms: Sequence[FlatTerm],
    term_tabs: tuple[torch.Tensor, torch.Tensor] | None,
    uf: torch.Tensor,
    src: torch.Tensor,
    *,
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    n_spin: int,
    n_colors: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``base + scale * H src`` on the output sites of ``tables`` (see the module docstring).

    Parameters
    ----------
    tables
        Site tables (:func:`hop_tables`).
    terms
        Half-spinor terms of ``H`` or ``H^dagger`` in ``(mu, backward)`` groups
        (``WilsonDirac._flat_terms[dagger]``).
    term_tabs
        :func:`term_tables` of ``terms`` (computed here when ``None``).
    uf
        Prepared forward links ``[B, d, V]`` (U(1)) or ``[B, d, V, N, N]``.
    src
        Source ``[B, n_src, Ns(, N)]`` in the packing ``tables.src_parity``.
    scale
        Real factor of the hop.
    base
        ``[B, n_out, Ns(, N)]`` added to the result, or ``None`` (zero).
    n_spin, n_colors
        ``Ns`` and ``N`` (1 for U(1)).
    backend
        ``"auto"`` (kernel when :func:`kernel_usable`, else torch), ``"torch"``, or ``"kernel"``
        (``RuntimeError`` if the kernel cannot take the call).

    Returns
    -------
    torch.Tensor
        ``[B, n_out, Ns(, N)]``, a new tensor.
    """
    check_backend(backend)
    if backend != "torch" and kernel_usable(uf, src, base, n_spin=n_spin, n_colors=n_colors):
        ints, coefs = term_tables(terms) if term_tabs is None else term_tabs
        return kernel_hop(tables, ints, coefs, uf, src, scale, base, n_spin, n_colors)
    if backend == "kernel":
        raise RuntimeError(
            "backend='kernel' but the compiled wilson_hop kernel cannot take this call (needs CPU, contiguous "
            "complex64/complex128 tensors without autograd, Ns in {2, 4}, N in {1, 2, 3}, and a built kernel)"
        )
    return _torch_hop(tables, terms, uf, src, scale, base, n_spin, n_colors)
