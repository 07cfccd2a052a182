"""ILDG/LIME and NERSC configuration files (latflow.ildg): round trips, byte layout, checksums, headers."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from latflow.ildg import (
    LIME_HEADER_BYTES,
    LIME_MAGIC,
    lime_pack,
    lime_parse,
    lime_records,
    read_ildg,
    read_nersc,
    scidac_checksum,
    write_ildg,
    write_nersc,
)
from latflow.sun import haar_sun, plaquette_mean

# L0 (time) = 6, L1 (x) = 4, L2 (y) = 3, L3 (z) = 2: every extent differs, so a swapped axis shows
SHAPE = (6, 4, 3, 2)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def haar_links(seed: int = 11) -> torch.Tensor:
    """Haar-random SU(3) links ``[4, 6, 4, 3, 2, 3, 3]`` complex128."""
    gen = torch.Generator().manual_seed(seed)
    return haar_sun((4, *SHAPE), 3, gen)


def tagged_links() -> torch.Tensor:
    """Links ``[4, L0, L1, L2, L3, 3, 3]`` whose entries encode the latflow direction, the site and the entry.

    ``Re U[a, b] = 10000 mu + 1000 t + 100 x + 10 y + z + 3 a + b`` and ``Im U[a, b] = -(3 a + b) - 1/2``.
    """
    mu, t, x, y, z = torch.meshgrid(*(torch.arange(n) for n in (4, *SHAPE)), indexing="ij")
    tag = (10000 * mu + 1000 * t + 100 * x + 10 * y + z).to(torch.float64)
    entries = torch.arange(9, dtype=torch.float64).reshape(3, 3)
    return torch.complex(tag[..., None, None] + entries, -entries - 0.5)


def site_offset(t: int, x: int, y: int, z: int, mu_file: int, bytes_per_link: int) -> int:
    """Byte offset of link ``mu_file`` (x, y, z, t = 0..3) at a site, from the start of the binary data."""
    l0, l1, l2, l3 = SHAPE
    rank = x + l1 * (y + l2 * (z + l3 * t))
    return (4 * rank + mu_file) * bytes_per_link


def test_ildg_round_trip_64_bit_exact(tmp_path):
    links = haar_links()
    path = tmp_path / "cfg.lime"
    write_ildg(path, links, extra_xml="<note>hello</note>")
    back, meta = read_ildg(path)
    assert back.dtype == torch.complex128 and back.shape == links.shape
    assert torch.equal(back, links)
    assert (meta["lx"], meta["ly"], meta["lz"], meta["lt"]) == (4, 3, 2, 6)
    assert meta["precision"] == 64 and meta["field"] == "su3gauge"
    assert meta["checksum_verified"]
    assert meta["user_xml"] == "<note>hello</note>"


def test_ildg_round_trip_32_bit(tmp_path):
    links = haar_links(12)
    path = tmp_path / "cfg32.lime"
    write_ildg(path, links, precision=32)
    back, meta = read_ildg(path)
    assert meta["precision"] == 32
    assert torch.equal(back, links.to(torch.complex64).to(torch.complex128))
    assert (back - links).abs().max() < 1e-6


def test_ildg_axis_and_direction_mapping_on_raw_bytes(tmp_path):
    links = tagged_links()
    path = tmp_path / "tagged.lime"
    write_ildg(path, links)
    raw = path.read_bytes()
    (data,) = [r for r in lime_records(path) if r.type == "ildg-binary-data"]
    link_bytes = 9 * 16
    assert data.length == 4 * np.prod(SHAPE) * link_bytes
    file_to_latflow = (1, 2, 3, 0)  # file x, y, z, t -> latflow axis 1, 2, 3, 0
    for t, x, y, z in [(0, 0, 0, 0), (5, 3, 2, 1), (1, 2, 0, 1), (4, 0, 2, 0), (2, 3, 1, 1)]:
        for mu_file in range(4):
            start = data.offset + site_offset(t, x, y, z, mu_file, link_bytes)
            m = np.frombuffer(raw[start : start + link_bytes], dtype=">f8").reshape(3, 3, 2)
            want = links[file_to_latflow[mu_file], t, x, y, z]
            np.testing.assert_array_equal(m[..., 0], want.real.numpy())  # row-major, (re, im)
            np.testing.assert_array_equal(m[..., 1], want.imag.numpy())
    back, _ = read_ildg(path)
    assert torch.equal(back, links)


def test_lime_record_layout(tmp_path):
    path = tmp_path / "cfg.lime"
    write_ildg(path, haar_links())
    raw = path.read_bytes()
    records = lime_records(path)
    assert [r.type for r in records] == [
        "scidac-private-file-xml",
        "scidac-file-xml",
        "scidac-private-record-xml",
        "scidac-record-xml",
        "ildg-format",
        "ildg-binary-data",
        "scidac-checksum",
    ]
    assert [(r.mb, r.me) for r in records] == [
        (True, False),
        (False, True),
        (True, False),
        (False, False),
        (False, False),
        (False, False),
        (False, True),
    ]
    pos = 0
    for rec in records:
        magic, version, flags, length = struct.unpack(">IHHQ", raw[pos : pos + 16])
        assert magic == LIME_MAGIC == 0x456789AB and version == 1 and length == rec.length
        assert flags == (0x8000 if rec.mb else 0) | (0x4000 if rec.me else 0)
        assert raw[pos + 16 : pos + LIME_HEADER_BYTES].rstrip(b"\0").decode() == rec.type
        assert rec.offset == pos + LIME_HEADER_BYTES
        padded = -(-rec.length // 8) * 8
        assert raw[rec.offset + rec.length : rec.offset + padded] == b"\0" * (padded - rec.length)
        pos = rec.offset + padded
        assert pos % 8 == 0
    assert pos == len(raw)
    fmt = raw[records[4].offset : records[4].offset + records[4].length].decode()
    for tag in ("<field>su3gauge</field>", "<precision>64</precision>", "<lx>4</lx>", "<ly>3</ly>", "<lz>2</lz>"):
        assert tag in fmt
    assert "<lt>6</lt>" in fmt


def test_lime_pack_parse_odd_lengths():
    messages = [[("a", b"x" * 3), ("bb", b"")], [("ccc", b"y" * 17)]]
    raw = lime_pack(messages)
    recs = lime_parse(raw)
    assert [(r.type, r.length, r.mb, r.me) for r in recs] == [
        ("a", 3, True, False),
        ("bb", 0, False, True),
        ("ccc", 17, True, True),
    ]
    assert raw[recs[2].offset : recs[2].offset + 17] == b"y" * 17
    assert len(raw) == 3 * LIME_HEADER_BYTES + 8 + 0 + 24


def test_scidac_checksum_independent():
    """suma/sumb recomputed site by site with explicit rotations, against the module."""
    rng = np.random.default_rng(5)
    volume, size = 70, 24  # > 31 sites so both rotations wrap
    data = rng.integers(0, 256, volume * size, dtype=np.uint8).tobytes()
    suma = sumb = 0
    for r in range(volume):
        c = zlib.crc32(data[r * size : (r + 1) * size])
        bits = format(c, "032b")
        suma ^= int(bits[r % 29 :] + bits[: r % 29], 2)
        sumb ^= int(bits[r % 31 :] + bits[: r % 31], 2)
    assert scidac_checksum(data, volume) == (suma, sumb)


def test_ildg_corrupted_byte_fails_checksum(tmp_path):
    path = tmp_path / "cfg.lime"
    write_ildg(path, haar_links())
    (data,) = [r for r in lime_records(path) if r.type == "ildg-binary-data"]
    raw = bytearray(path.read_bytes())
    raw[data.offset + 1234] ^= 0x01
    bad = tmp_path / "bad.lime"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch") as err:
        read_ildg(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_ildg_truncated_and_wrong_files_fail_cleanly(tmp_path):
    path = tmp_path / "cfg.lime"
    write_ildg(path, haar_links())
    raw = path.read_bytes()
    for cut in (len(raw) - 100, len(raw) // 2, 100):
        short = tmp_path / f"short{cut}.lime"
        short.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated") as err:
            read_ildg(short)
        assert str(short) in str(err.value) and "\n" not in str(err.value)
    wrong = tmp_path / "wrong.lime"
    wrong.write_bytes(b"\0" * 200)
    with pytest.raises(ValueError, match="magic"):
        read_ildg(wrong)
    other = tmp_path / "other.lime"
    other.write_bytes(lime_pack([[("scidac-file-xml", b"<x/>")]]))
    with pytest.raises(ValueError, match="not an ILDG file"):
        read_ildg(other)


def test_writes_do_not_overwrite(tmp_path):
    links = haar_links()
    for writer, name in ((write_ildg, "a.lime"), (write_nersc, "a.nersc")):
        path = tmp_path / name
        writer(path, links)
        before = path.read_bytes()
        with pytest.raises(FileExistsError):
            writer(path, haar_links(99))
        assert path.read_bytes() == before
        writer(path, haar_links(99), overwrite=True)
        assert path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lime", "a.nersc"]  # no temporary files left


def _header(path) -> dict[str, str]:
    text = path.read_bytes().split(b"END_HEADER\n", 1)[0].decode()
    return {k.strip(): v.strip() for k, v in (line.split("=", 1) for line in text.splitlines()[1:])}


def _plaquette_file_order(u: np.ndarray) -> float:
    """<Re tr P>/3 from file-order links ``[lt, lz, ly, lx, 4, 3, 3]`` (mu = x, y, z, t), with np.roll."""
    site_axis = {0: 3, 1: 2, 2: 1, 3: 0}  # file direction -> array axis of the site index
    total, count = 0.0, 0
    for mu in range(4):
        for nu in range(mu + 1, 4):
            um, un = u[..., mu, :, :], u[..., nu, :, :]
            un_xmu = np.roll(un, -1, axis=site_axis[mu])
            um_xnu = np.roll(um, -1, axis=site_axis[nu])
            p = um @ un_xmu @ np.conj(np.swapaxes(um_xnu, -1, -2)) @ np.conj(np.swapaxes(un, -1, -2))
            total += np.trace(p, axis1=-2, axis2=-1).real.sum()
            count += p.shape[0] * p.shape[1] * p.shape[2] * p.shape[3]
    return total / count / 3


@pytest.mark.parametrize("two_rows", [False, True])
def test_nersc_round_trip_and_header(tmp_path, two_rows):
    links = haar_links(21)
    path = tmp_path / "cfg.nersc"
    write_nersc(path, links, two_rows=two_rows, ensemble_id="test-ens")
    back, header = read_nersc(path)
    if two_rows:
        assert (back - links).abs().max() < 1e-14  # third row reconstructed
    else:
        assert torch.equal(back, links)
    assert header["DATATYPE"] == ("4D_SU3_GAUGE" if two_rows else "4D_SU3_GAUGE_3x3")
    assert header["ENSEMBLE_ID"] == "test-ens" and header["FLOATING_POINT"] == "IEEE64BIG"
    assert [int(header[f"DIMENSION_{i}"]) for i in range(1, 5)] == [4, 3, 2, 6]
    assert _header(path) == header
    # header values against latflow.sun and an independent computation on the raw data
    raw = path.read_bytes()
    data = raw[raw.index(b"END_HEADER\n") + len(b"END_HEADER\n") :]
    rows = 2 if two_rows else 3
    u = np.frombuffer(data, dtype=">c16").reshape(6, 2, 3, 4, 4, rows, 3)
    if two_rows:
        u = np.concatenate([u, np.conj(np.cross(u[..., 0, :], u[..., 1, :]))[..., None, :]], axis=-2)
    plaq = float(header["PLAQUETTE"])
    assert plaq == pytest.approx(float(plaquette_mean(links[None])[0]), abs=1e-13)
    assert plaq == pytest.approx(_plaquette_file_order(u), abs=1e-13)
    trace = np.trace(u, axis1=-2, axis2=-1).real.mean() / 3
    assert float(header["LINK_TRACE"]) == pytest.approx(trace, abs=1e-13)
    words = np.frombuffer(data, dtype=">u4").astype(np.uint64)
    assert int(header["CHECKSUM"], 16) == int(words.sum()) % 2**32


def test_nersc_32_bit_and_mapping(tmp_path):
    links = haar_links(22)
    path = tmp_path / "cfg32.nersc"
    write_nersc(path, links, precision=32)
    back, header = read_nersc(path)
    assert header["FLOATING_POINT"] == "IEEE32BIG"
    assert torch.equal(back, links.to(torch.complex64).to(torch.complex128))
    # same byte layout as ILDG: compare a tagged configuration's data with the ildg-binary-data record
    tagged = tagged_links()
    write_nersc(tmp_path / "t.nersc", tagged)
    write_ildg(tmp_path / "t.lime", tagged)
    (rec,) = [r for r in lime_records(tmp_path / "t.lime") if r.type == "ildg-binary-data"]
    ildg_data = (tmp_path / "t.lime").read_bytes()[rec.offset : rec.offset + rec.length]
    assert (tmp_path / "t.nersc").read_bytes().split(b"END_HEADER\n", 1)[1] == ildg_data


def test_nersc_two_row_reconstruction_su3():
    from latflow.ildg import reconstruct_third_row

    u = haar_sun((50,), 3, torch.Generator().manual_seed(3))
    assert (reconstruct_third_row(u[..., :2, :]) - u).abs().max() < 1e-14


def test_nersc_mismatches_fail(tmp_path):
    path = tmp_path / "cfg.nersc"
    write_nersc(path, haar_links(23))
    raw = path.read_bytes()
    start = raw.index(b"END_HEADER\n") + len(b"END_HEADER\n")
    cases = {}
    corrupt = bytearray(raw)
    corrupt[start + 500] ^= 0x10
    cases["CHECKSUM mismatch"] = bytes(corrupt)
    h = _header(path)
    cases["PLAQUETTE mismatch"] = raw.replace(f"PLAQUETTE = {h['PLAQUETTE']}".encode(), b"PLAQUETTE = 0.5")
    cases["LINK_TRACE mismatch"] = raw.replace(f"LINK_TRACE = {h['LINK_TRACE']}".encode(), b"LINK_TRACE = 0.25")
    cases["expected"] = raw[:-8]  # truncated data
    cases["no END_HEADER"] = raw[:100]
    for i, (message, content) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.nersc"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=message) as err:
            read_nersc(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_bad_input_shapes(tmp_path):
    with pytest.raises(ValueError, match="complex"):
        write_ildg(tmp_path / "x.lime", torch.zeros(4, 2, 2, 2, 2, 3, 3))
    with pytest.raises(ValueError, match="precision"):
        write_nersc(tmp_path / "x.nersc", haar_links(), precision=16)
    assert not list(tmp_path.iterdir())


def test_nersc_reads_little_endian(tmp_path):
    """A little-endian file (as some codes write) reads back; its CHECKSUM is that of the host-order words."""
    links = haar_links(24)
    big = tmp_path / "big.nersc"
    write_nersc(big, links)
    raw = big.read_bytes()
    head, data = raw.split(b"END_HEADER\n", 1)
    little = np.frombuffer(data, dtype=">f8").astype("<f8").tobytes()
    path = tmp_path / "little.nersc"
    path.write_bytes(head.replace(b"IEEE64BIG", b"IEEE64LITTLE") + b"END_HEADER\n" + little)
    back, header = read_nersc(path)
    assert header["FLOATING_POINT"] == "IEEE64LITTLE"
    assert torch.equal(back, links)


def test_nersc_extra_header(tmp_path):
    links = haar_links()
    write_nersc(tmp_path / "a", links, extra_header={"BETA": "5.7"})
    _, header = read_nersc(tmp_path / "a")
    assert header["BETA"] == "5.7"
    for bad in ({"PLAQUETTE": "1"}, {"beta": "5.7"}, {"BETA": "5\n7"}):
        with pytest.raises(ValueError, match="extra header"):
            write_nersc(tmp_path / "b", links, extra_header=bad)
    assert not (tmp_path / "b").exists()
