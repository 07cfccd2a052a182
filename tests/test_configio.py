"""SU(3) configuration files through latflow.configio (ILDG, NERSC, openQCD) and `latflow export` / `import`."""

from __future__ import annotations

import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from latflow.configio import (
    ConfigurationError,
    detect_format,
    embed_2d,
    is_embedded_2d,
    read_configuration,
    write_configuration,
)
from latflow.ildg import write_ildg
from latflow.lattice import Lattice
from latflow.manifolds import SUN
from latflow.openqcd import HEADER_BYTES, file_size, read_openqcd, write_openqcd
from latflow.samplers.hmc import HMC
from latflow.sun import haar_sun, plaquette_mean
from latflow.theories.su3 import SUNGaugeAction, SUNParams

FORMATS = ("ildg", "nersc", "openqcd")
# L0 (time) = 6, then 4, 2, 8: all even (openQCD) and all different, so a swapped axis shows
SHAPE4 = (6, 4, 2, 8)
SHAPE2 = (6, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def haar_links(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Haar-random SU(3) links ``[d, *shape, 3, 3]`` complex128."""
    return haar_sun((len(shape), *shape), 3, torch.Generator().manual_seed(seed))


def _one_line(exc: pytest.ExceptionInfo, path: Path) -> str:
    text = str(exc.value)
    assert "\n" not in text and str(path) in text, text
    return text


# --- library: round trips, layout, headers ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [SHAPE4, SHAPE2], ids=["4d", "2d"])
def test_round_trip_bitwise(tmp_path, fmt, shape):
    links = haar_links(shape, seed=len(shape) + FORMATS.index(fmt))
    path = tmp_path / f"cfg.{fmt}"
    info = write_configuration(path, links, fmt, beta=5.7)
    assert info["shape"] == shape and info["embedded_2d"] == (len(shape) == 2)
    back, rinfo = read_configuration(path)
    assert back.dtype == np.complex128 and back.shape == tuple(links.shape)
    assert np.array_equal(back, links.numpy())  # bitwise
    assert rinfo["format"] == fmt and detect_format(path) == fmt
    assert rinfo["shape"] == shape and rinfo["checksum_verified"]
    assert rinfo["plaquette"] == pytest.approx(float(plaquette_mean(links[None])[0]), abs=1e-14)
    # write what was read: the same links again
    write_configuration(path, back, fmt, beta=5.7, force=True)
    again, _ = read_configuration(path, fmt)
    assert np.array_equal(again, back)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedded_2d_layout(tmp_path, fmt):
    links = haar_links(SHAPE2, seed=4)
    path = tmp_path / "cfg"
    write_configuration(path, links, fmt)
    u4, info = read_configuration(path, ndim=4)
    extent = 4 if fmt == "openqcd" else 1
    assert info["file_shape"] == (*SHAPE2, extent, extent) and u4.shape == (4, *SHAPE2, extent, extent, 3, 3)
    assert np.array_equal(u4[2:], np.broadcast_to(np.eye(3), u4[2:].shape))
    for x2 in range(extent):
        for x3 in range(extent):
            assert np.array_equal(u4[:2, :, :, x2, x3], links.numpy())
    assert is_embedded_2d(torch.from_numpy(u4))
    p2 = float(plaquette_mean(links[None])[0])
    assert info["plaquette_4d"] == pytest.approx((p2 + 5) / 6, abs=1e-14)
    u2, info2 = read_configuration(path, ndim=2)
    assert np.array_equal(u2, links.numpy()) and info2["embedded_2d"]


def test_genuine_4d_is_not_read_as_2d(tmp_path):
    links = haar_links((4, 4, 2, 2), seed=5)
    path = tmp_path / "c.lime"
    write_configuration(path, links, "ildg")
    back, info = read_configuration(path)
    assert back.shape[0] == 4 and not info["embedded_2d"]
    with pytest.raises(ConfigurationError, match="not a 2D lattice") as exc:
        read_configuration(path, ndim=2)
    _one_line(exc, path)
    # identity links in directions 2, 3 but x2-dependent directions 0, 1: 4D as well
    u = embed_2d(haar_links((4, 4), seed=6), 2)
    u[0, :, :, 1] = haar_sun((4, 4, 2), 3, torch.Generator().manual_seed(7))
    assert not is_embedded_2d(u)


def _odd_points(shape: tuple[int, ...]) -> list[tuple[int, int, int, int]]:
    n0, n1, n2, n3 = shape
    return [
        (x0, x1, x2, x3)
        for x0 in range(n0)
        for x1 in range(n1)
        for x2 in range(n2)
        for x3 in range(n3)  # x3 fastest
        if (x0 + x1 + x2 + x3) % 2
    ]


def test_openqcd_layout_on_raw_bytes(tmp_path):
    """openQCD's order, element by element: odd points lexicographic (x3 fastest), links +0, -0, ..., +3, -3."""
    shape = SHAPE4
    links = haar_links(shape, seed=8)
    path = tmp_path / "c.oqcd"
    write_openqcd(path, links)
    raw = path.read_bytes()
    assert len(raw) == file_size(shape) == 24 + 576 * int(np.prod(shape))
    assert struct.unpack_from("<4i", raw) == shape  # N0 = time first
    u = links.numpy()
    data = np.frombuffer(raw, dtype="<f8", offset=HEADER_BYTES).reshape(-1, 8, 3, 3, 2)
    points = _odd_points(shape)
    assert data.shape[0] == len(points)
    for k in (0, 1, len(points) // 2, len(points) - 1):
        x = points[k]
        for mu in range(4):
            back = list(x)
            back[mu] = (back[mu] - 1) % shape[mu]
            for col, site in ((2 * mu, x), (2 * mu + 1, tuple(back))):
                stored = data[k, col, ..., 0] + 1j * data[k, col, ..., 1]  # row-major (re, im)
                assert np.array_equal(stored, u[(mu, *site)]), (k, mu, col)


def test_openqcd_header_plaquette_normalisation(tmp_path):
    """openQCD's header holds <Re tr P> (3 for the unit field) = 3 x latflow's <Re tr P>/3."""
    cold = embed_2d(torch.eye(3, dtype=torch.complex128).expand(2, 4, 4, 3, 3).clone(), 4)
    path = tmp_path / "cold.oqcd"
    write_openqcd(path, cold)
    assert struct.unpack_from("<d", path.read_bytes(), 16)[0] == 3.0
    links = haar_links(SHAPE4, seed=9)
    write_openqcd(tmp_path / "hot.oqcd", links)
    stated = struct.unpack_from("<d", (tmp_path / "hot.oqcd").read_bytes(), 16)[0]
    assert stated == pytest.approx(3 * float(plaquette_mean(links[None])[0]), abs=1e-15)
    _, meta = read_openqcd(tmp_path / "hot.oqcd")
    assert meta["plaquette"] == stated


@pytest.mark.parametrize("fmt", ["nersc", "openqcd"])
def test_header_plaquette_equals_ours(tmp_path, fmt):
    links = haar_links(SHAPE4, seed=10)
    path = tmp_path / "c"
    write_configuration(path, links, fmt)
    _, info = read_configuration(path)
    ours = float(plaquette_mean(links[None])[0])
    assert info["header_plaquette"] == pytest.approx(ours, abs=1e-14)
    assert info["plaquette"] == pytest.approx(ours, abs=1e-15)


def test_beta_and_metadata(tmp_path):
    links = haar_links(SHAPE4, seed=11)
    for fmt, expect in (("ildg", 5.95), ("nersc", 5.95), ("openqcd", None)):
        write_configuration(tmp_path / fmt, links, fmt, beta=5.95)
        assert read_configuration(tmp_path / fmt)[1]["beta"] == expect


def test_32_bit_files(tmp_path):
    links = haar_links(SHAPE4, seed=12)
    for fmt in ("ildg", "nersc"):
        write_configuration(tmp_path / fmt, links, fmt, precision=32)
        back, info = read_configuration(tmp_path / fmt)
        assert info["precision"] == 32
        assert np.abs(back - links.numpy()).max() < 1e-6
    with pytest.raises(ConfigurationError, match="precision 64"):
        write_configuration(tmp_path / "o", links, "openqcd", precision=32)


def test_nersc_two_rows(tmp_path):
    links = haar_links(SHAPE4, seed=13)
    write_configuration(tmp_path / "n", links, "nersc", two_rows=True)
    back, _ = read_configuration(tmp_path / "n")
    assert np.abs(back - links.numpy()).max() < 1e-14


def test_never_overwrites_without_force(tmp_path):
    a, b = haar_links(SHAPE4, seed=14), haar_links(SHAPE4, seed=15)
    for fmt in FORMATS:
        path = tmp_path / fmt
        write_configuration(path, a, fmt)
        before = path.read_bytes()
        with pytest.raises(ConfigurationError, match="exists") as exc:
            write_configuration(path, b, fmt)
        _one_line(exc, path)
        assert path.read_bytes() == before
        write_configuration(path, b, fmt, force=True)
        assert np.array_equal(read_configuration(path)[0], b.numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FORMATS)  # no temporary files left


# --- checksums and damaged files ----------------------------------------------------------------------------


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("fmt", "what"),
    [("ildg", "SciDAC checksum mismatch"), ("nersc", "CHECKSUM mismatch"), ("openqcd", "plaquette mismatch")],
)
def test_corrupted_data_fail_checksum(tmp_path, fmt, what):
    links = haar_links(SHAPE4, seed=16)
    path = tmp_path / "c"
    write_configuration(path, links, fmt)
    size = path.stat().st_size
    # ILDG: a byte in the binary record (the checksum record follows it); NERSC/openQCD: in the data.
    # openQCD's only check is the plaquette: flip a high-order bit of a double so that it shows.
    offset = size - 2000 if fmt == "ildg" else size - 1
    _flip(path, offset, 0x10 if fmt == "openqcd" else 0x01)
    with pytest.raises(ConfigurationError, match=what) as exc:
        read_configuration(path)
    _one_line(exc, path)


def test_openqcd_header_plaquette_checked(tmp_path):
    path = tmp_path / "c.oqcd"
    write_configuration(path, haar_links(SHAPE4, seed=17), "openqcd")
    raw = bytearray(path.read_bytes())
    stated = struct.unpack_from("<d", raw, 16)[0]
    struct.pack_into("<d", raw, 16, stated + 1e-9)
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigurationError, match="plaquette mismatch"):
        read_configuration(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files(tmp_path, fmt):
    path = tmp_path / "c"
    write_configuration(path, haar_links(SHAPE4, seed=18), fmt)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 8])
    with pytest.raises(ConfigurationError) as exc:
        read_configuration(path)
    _one_line(exc, path)
    with pytest.raises(ConfigurationError) as exc:  # forced format
        read_configuration(path, fmt)
    _one_line(exc, path)


def test_unrecognised_missing_and_wrong_format(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01\x02" * 100)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (junk, empty, tmp_path / "missing"):
        with pytest.raises(ConfigurationError) as exc:
            read_configuration(path)
        _one_line(exc, path)
    lime = tmp_path / "c.lime"
    write_configuration(lime, haar_links(SHAPE4, seed=19), "ildg")
    for fmt in ("nersc", "openqcd"):
        with pytest.raises(ConfigurationError) as exc:
            read_configuration(lime, fmt)
        _one_line(exc, lime)
    with pytest.raises(ConfigurationError, match="unknown configuration format"):
        read_configuration(lime, "milc")


def test_non_su3_rejected(tmp_path):
    # writing: SU(2) links, a non-unitary field, a wrong rank
    with pytest.raises(ConfigurationError, match="SU\\(3\\)"):
        write_configuration(tmp_path / "a", haar_sun((4, 2, 2, 2, 2), 2, torch.Generator().manual_seed(0)), "ildg")
    bad = haar_links(SHAPE4, seed=20)
    bad[1, 0, 0, 0, 0] *= 1.01
    with pytest.raises(ConfigurationError, match="not SU\\(3\\)"):
        write_configuration(tmp_path / "b", bad, "nersc")
    with pytest.raises(ConfigurationError):
        write_configuration(tmp_path / "c", haar_links((4, 4, 4), seed=21), "ildg")
    assert not any(tmp_path.iterdir())
    # reading: a consistent file (valid checksum) whose matrices are not in SU(3)
    path = tmp_path / "nonsu3.lime"
    write_ildg(path, bad)
    with pytest.raises(ConfigurationError, match="not SU\\(3\\)") as exc:
        read_configuration(path)
    _one_line(exc, path)
    path = tmp_path / "nonsu3.oqcd"
    write_openqcd(path, bad)
    with pytest.raises(ConfigurationError, match="not SU\\(3\\)"):
        read_configuration(path)


# --- an imported configuration starts HMC ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 4, 4, 4), (6, 6)], ids=["4d", "2d"])
def test_imported_configuration_starts_hmc(tmp_path, shape):
    path = tmp_path / "start.oqcd"
    write_configuration(path, haar_links(shape, seed=22), "openqcd")
    links, info = read_configuration(path)
    assert info["shape"] == shape
    theory = SUNGaugeAction(SUNParams(beta=5.5 if len(shape) == 4 else 4.0), Lattice(shape))
    x0 = torch.from_numpy(links)[None]
    hmc = HMC(
        theory.action,
        x0=x0,
        manifold=SUN(3),
        step_size=0.02,
        n_steps=5,
        generator=torch.Generator().manual_seed(1),
    )
    block = hmc.run(2)
    assert block.x.shape == (2, *x0.shape[1:])
    assert torch.isfinite(block.log_p).all()
    eye = torch.eye(3, dtype=block.x.dtype)
    assert (block.x[-1] @ block.x[-1].transpose(-2, -1).conj() - eye).abs().max() < 1e-12
    if bool(block.accepted.any()):
        assert not torch.equal(block.x[-1], x0[0])


# --- the command line ----------------------------------------------------------------------------------------


def _ok(r) -> None:
    assert r.returncode == 0, str(r)
    assert "Traceback" not in r.stderr + r.stdout, str(r)


def _refused(r, *needles: str) -> str:
    """Exit status 2, one line on stderr (naming what went wrong), no traceback."""
    assert r.returncode == 2, str(r)
    assert "Traceback" not in r.stderr + r.stdout, str(r)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latflow: error: "), str(r)
    for needle in needles:
        assert needle in lines[0], str(r)
    return lines[0]


def _rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {f"{g}/{k}": f[g][k][()] for g in ("fields", "observables") for k in f[g]}


def _write_files(tmp_path: Path, shape: tuple[int, ...], fmt: str, n: int, beta: float | None) -> list[str]:
    names = []
    for k in range(n):
        name = f"in{k}.{fmt}"
        write_configuration(tmp_path / name, haar_links(shape, seed=100 + k), fmt, beta=beta)
        names.append(name)
    return names


@pytest.mark.parametrize("shape", [(4, 4, 2, 2), (4, 6)], ids=["4d", "2d"])
def test_cli_export_import_round_trip(latflow_cli, tmp_path, shape):
    files = _write_files(tmp_path, shape, "ildg", 3, beta=None)
    _ok(latflow_cli.run(["import", *files, "-o", "ens.h5", "--theory", "su3", "--set", "theory.beta=5.5"], tmp_path))
    _ok(latflow_cli.run(["verify", "ens.h5"], tmp_path))
    _ok(latflow_cli.run(["analyze", "ens.h5", "--json"], tmp_path))
    original = _rows(tmp_path / "ens.h5")
    assert original["fields/links"].shape == (3, len(shape), *shape, 3, 3)
    for k, name in enumerate(files):
        assert np.array_equal(original["fields/links"][k], read_configuration(tmp_path / name)[0])
    # the observables are the theory's, measured on the imported links
    theory = SUNGaugeAction(SUNParams(beta=5.5), Lattice(shape))
    with torch.no_grad():
        obs = theory.observables(torch.from_numpy(original["fields/links"]))
    for name, value in obs.items():
        assert np.array_equal(original[f"observables/{name}"], value.numpy()), name
    for fmt in FORMATS:
        _ok(latflow_cli.run(["export", "ens.h5", "--format", fmt, "-o", f"out{{row}}.{fmt}"], tmp_path))
        outs = [f"out{k}.{fmt}" for k in range(3)]
        assert all((tmp_path / o).is_file() for o in outs)
        # the files record beta (ILDG, NERSC); openQCD's need it on the command line
        args = ["import", *outs, "-o", f"back_{fmt}.h5"] + (["--beta", "5.5"] if fmt == "openqcd" else [])
        _ok(latflow_cli.run(args, tmp_path))
        back = _rows(tmp_path / f"back_{fmt}.h5")
        assert back.keys() == original.keys()
        for key in original:
            assert np.array_equal(back[key], original[key]), (fmt, key)
        with h5py.File(tmp_path / f"back_{fmt}.h5", "r") as f:
            assert f.attrs["theory"] in ("su3", b"su3")
    # one row, and a row range
    _ok(latflow_cli.run(["export", "ens.h5", "--format", "nersc", "--row", "-1", "-o", "last.nersc"], tmp_path))
    assert np.array_equal(read_configuration(tmp_path / "last.nersc")[0], original["fields/links"][2])
    _ok(latflow_cli.run(["export", "ens.h5", "--format", "ildg", "--rows", "0:3:2", "-o", "r{row}.lime"], tmp_path))
    assert (tmp_path / "r0.lime").is_file() and (tmp_path / "r2.lime").is_file()
    assert not (tmp_path / "r1.lime").exists()


def test_cli_rejects_bad_input(latflow_cli, tmp_path):
    shape = (4, 4, 2, 2)
    files = _write_files(tmp_path, shape, "nersc", 2, beta=6.0)
    _ok(latflow_cli.run(["import", *files, "-o", "ens.h5"], tmp_path))  # beta from the NERSC headers
    ens = (tmp_path / "ens.h5").read_bytes()

    # a damaged file: checksum mismatch; nothing written, the existing ensemble untouched
    _flip(tmp_path / files[1], (tmp_path / files[1]).stat().st_size - 3)
    _refused(latflow_cli.run(["import", *files, "-o", "new.h5"], tmp_path), files[1], "CHECKSUM mismatch")
    assert not (tmp_path / "new.h5").exists()
    _refused(latflow_cli.run(["import", *files, "-o", "ens.h5", "--force"], tmp_path), files[1])
    assert (tmp_path / "ens.h5").read_bytes() == ens
    # truncated, not a configuration at all, wrong forced format, non-SU(3)
    (tmp_path / "short.nersc").write_bytes((tmp_path / files[0]).read_bytes()[:-100])
    _refused(latflow_cli.run(["import", "short.nersc", "-o", "new.h5"], tmp_path), "short.nersc")
    _refused(latflow_cli.run(["import", "ens.h5", "-o", "new.h5", "--beta", "6"], tmp_path), "ens.h5")
    _refused(latflow_cli.run(["import", files[0], "-o", "new.h5", "--format", "ildg"], tmp_path), files[0])
    bad = haar_links(shape, seed=30)
    bad[0, 1, 1, 1, 1] *= 2
    write_ildg(tmp_path / "bad.lime", bad)
    _refused(latflow_cli.run(["import", "bad.lime", "-o", "new.h5", "--beta", "6"], tmp_path), "bad.lime", "SU(3)")
    # files of different lattices; no coupling; a missing file; an existing output
    write_configuration(tmp_path / "other.nersc", haar_links((2, 2, 2, 2), seed=31), "nersc")
    _refused(latflow_cli.run(["import", files[0], "other.nersc", "-o", "new.h5"], tmp_path), "other.nersc")
    write_configuration(tmp_path / "nobeta.lime", haar_links(shape, seed=32), "ildg")
    _refused(latflow_cli.run(["import", "nobeta.lime", "-o", "new.h5"], tmp_path), "theory.beta")
    _refused(latflow_cli.run(["import", "missing.lime", "-o", "new.h5", "--beta", "6"], tmp_path), "missing.lime")
    _refused(latflow_cli.run(["import", files[0], "-o", "ens.h5"], tmp_path), "ens.h5", "exists")
    assert not (tmp_path / "new.h5").exists()
    assert (tmp_path / "ens.h5").read_bytes() == ens

    # export: existing targets, several rows without {row}, rows out of range, a damaged ensemble
    (tmp_path / "taken1.lime").write_bytes(b"keep")
    r = latflow_cli.run(["export", "ens.h5", "--format", "ildg", "-o", "taken{row}.lime"], tmp_path)
    _refused(r, "taken1.lime", "--force")
    assert (tmp_path / "taken1.lime").read_bytes() == b"keep" and not (tmp_path / "taken0.lime").exists()
    _refused(latflow_cli.run(["export", "ens.h5", "--format", "ildg", "-o", "one.lime"], tmp_path), "{row}")
    _refused(latflow_cli.run(["export", "ens.h5", "--format", "ildg", "--row", "5", "-o", "x.lime"], tmp_path), "5")
    with h5py.File(tmp_path / "ens.h5", "r+") as f:
        f["fields/links"][0, 0, 0, 0, 0, 0] = 0.5 * f["fields/links"][0, 0, 0, 0, 0, 0]
    r = latflow_cli.run(["export", "ens.h5", "--format", "ildg", "-o", "d{row}.lime"], tmp_path)
    _refused(r, "ens.h5", "damaged")
    assert not list(tmp_path.glob("d*.lime"))
