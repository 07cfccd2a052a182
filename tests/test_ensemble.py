"""Tests of latflow.ensemble: the HDF5 ensemble format, crash safety, checksums, foreign files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import latflow
from latflow import ensemble as ens
from latflow.ensemble import (
    EnsembleError,
    EnsembleExistsError,
    EnsembleMeta,
    EnsembleReader,
    EnsembleWriter,
    sha256_of_rows,
    verify,
)

SHAPE = (4, 3)


def make_meta(**over) -> EnsembleMeta:
    kw = dict(
        theory="phi4",
        couplings={"m2": -4.0, "lam": 8.0},
        lattice_shape=SHAPE,
        sampler={"kind": "flow-mcmc", "batch": 16, "nested": {"a": [1, 2]}},
        seed=1234,
        job='[theory]\nname = "phi4"\n',
        model_sha256="ab" * 32,
    )
    kw.update(over)
    return EnsembleMeta(**kw)


def make_rows(start: int, n: int) -> dict[str, np.ndarray]:
    """Rows ``start .. start+n-1``; row i holds the value i everywhere (bool: i odd)."""
    i = np.arange(start, start + n)
    return {
        "fields/phi": np.broadcast_to(i[:, None, None], (n, *SHAPE)).astype(np.float64),
        "markov/chain": (i % 2).astype(np.int32),  # stored as int64
        "markov/step": i.astype(np.int64),
        "markov/accepted": (i % 2).astype(bool),
        "weights/log_p": i.astype(np.float64),
        "weights/log_q": i.astype(np.float64),
        "weights/log_w": i.astype(np.float64),
        "observables/magnetization": i.astype(np.float32),  # float32 stays float32
        "observables/corr": np.broadcast_to(i[:, None], (n, 3)).astype(np.float64),
    }


def check_rows(r: EnsembleReader, n: int) -> None:
    """Every committed row i holds the value i in every dataset."""
    assert r.n_committed == n
    i = np.arange(n)
    np.testing.assert_array_equal(r.read("fields/phi"), np.broadcast_to(i[:, None, None], (n, *SHAPE)))
    np.testing.assert_array_equal(r.read("markov/chain"), i % 2)
    np.testing.assert_array_equal(r.read("markov/step"), i)
    np.testing.assert_array_equal(r.read("markov/accepted"), (i % 2).astype(bool))
    for w in ("log_p", "log_q", "log_w"):
        np.testing.assert_array_equal(r.read(f"weights/{w}"), i)
    np.testing.assert_array_equal(r.read("observables/magnetization"), i)
    np.testing.assert_array_equal(r.read("observables/corr"), np.broadcast_to(i[:, None], (n, 3)))


def expected_sha(ds: h5py.Dataset, n: int) -> str:
    return hashlib.sha256(np.ascontiguousarray(ds[:n]).astype(ds.dtype.newbyteorder("<")).tobytes()).hexdigest()


# ----------------------------------------------------------------------------------------------


def test_round_trip_several_commits(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    meta = make_meta()
    sizes = [3, 1, 5]
    with EnsembleWriter.create(path, meta) as w:
        assert w.n_committed == 0 and w.path == path
        n = 0
        for k in sizes:
            w.append(make_rows(n, k), state=f"state {n + k}".encode())
            n += k
            assert w.n_committed == n
            with EnsembleReader(path) as r:  # readable while the writer holds the file
                check_rows(r, n)
    assert verify(path) == []

    with EnsembleReader(path) as r:
        check_rows(r, 9)
        assert r.theory == "phi4"
        assert r.couplings == {"m2": -4.0, "lam": 8.0}
        assert r.sampler == {"kind": "flow-mcmc", "batch": 16, "nested": {"a": [1, 2]}}
        assert r.lattice_shape == SHAPE and all(type(s) is int for s in r.lattice_shape)
        assert r.seed == 1234 and type(r.seed) is int
        assert r.meta == meta
        a = r.attrs
        assert a["format"] == "latflow-ensemble"
        assert a["format_version"] == 1 and type(a["format_version"]) is int
        assert a["latflow_version"] == latflow.__version__
        assert a["n_committed"] == 9
        assert json.loads(a["couplings"]) == meta.couplings  # JSON attributes stay str
        assert a["job"] == meta.job and a["model_sha256"] == meta.model_sha256
        assert a["created_utc"].endswith("+00:00")
        np.testing.assert_array_equal(a["lattice_shape"], SHAPE)
        # dtypes
        assert r.read("fields/phi").dtype == np.float64
        assert r.read("markov/chain").dtype == np.int64
        assert r.read("markov/step").dtype == np.int64
        assert r.read("markov/accepted").dtype == np.bool_
        assert r.read("observables/magnetization").dtype == np.float32
        # names / has / slices
        assert r.names("weights") == ["log_p", "log_q", "log_w"]
        assert r.names("observables") == ["corr", "magnetization"]
        assert r.names("nope") == []
        assert r.has("fields/phi") and not r.has("fields/links") and not r.has("fields")
        np.testing.assert_array_equal(r.read("markov/step", slice(2, 5)), [2, 3, 4])
        np.testing.assert_array_equal(r.read("markov/step", slice(None, None, 4)), [0, 4, 8])
        np.testing.assert_array_equal(r.read("markov/step", slice(None, None, -3)), [8, 5, 2])
        np.testing.assert_array_equal(r.read("markov/step", slice(-2, None)), [7, 8])
        assert r.read("fields/phi", slice(5, 5)).shape == (0, *SHAPE)
        with pytest.raises(EnsembleError, match="e.h5"):
            r.read("fields/links")

    with h5py.File(path, "r") as f:  # the file itself follows the format
        for key in ens.REQUIRED_ATTRS:
            assert key in f.attrs
        for name in ("fields/phi", "markov/step", "observables/corr"):
            ds = f[name]
            assert ds.chunks is not None and ds.maxshape[0] is None
        ds = f["fields/phi"]
        assert ds.attrs["sha256"].decode() == expected_sha(ds, 9)
        # no absolute paths anywhere in the attributes
        for obj in [f, *(f[k] for k in ("fields/phi", "checkpoint"))]:
            for v in obj.attrs.values():
                assert str(tmp_path) not in str(v)


def test_append_validation(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, make_meta()) as w:
        w.append(make_rows(0, 2))
        bad_len = make_rows(2, 2)
        bad_len["weights/log_p"] = np.zeros(3)
        extra = make_rows(2, 2) | {"observables/new": np.zeros(2)}
        missing = make_rows(2, 2)
        del missing["weights/log_w"]
        wrong_shape = make_rows(2, 2)
        wrong_shape["fields/phi"] = np.zeros((2, 3, 4))
        wrong_shape2 = make_rows(2, 2)
        wrong_shape2["observables/corr"] = np.zeros((2, 4))
        not_bool = make_rows(2, 2)
        not_bool["markov/accepted"] = np.array([0.0, 1.0])
        for bad in (bad_len, extra, missing, wrong_shape, wrong_shape2, not_bool, {}):
            with pytest.raises(ValueError):
                w.append(bad)
        with pytest.raises(ValueError):
            w.append({k: v[:0] for k, v in make_rows(2, 2).items()})  # zero rows
        assert w.n_committed == 2
        w.append(make_rows(2, 2))  # the writer is still usable
        assert w.n_committed == 4
    assert verify(path) == []
    with EnsembleReader(path) as r:
        check_rows(r, 4)

    with EnsembleWriter.create(tmp_path / "m.h5", make_meta()) as w:
        with pytest.raises(ValueError):
            EnsembleWriter.create(tmp_path / "x.h5", make_meta(sampler={"batch": 1}))
        with pytest.raises(EnsembleError, match="closed"):
            w.close()
            w.append(make_rows(0, 1))


def test_existing_file_needs_force(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, make_meta()) as w:
        w.append(make_rows(0, 3))
    before = path.read_bytes()
    with pytest.raises(EnsembleExistsError, match=r"e\.h5: ensemble exists; use --resume to append or --force"):
        EnsembleWriter.create(path, make_meta(theory="u1"))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.h5"]  # no temporary left behind

    other = tmp_path / "not_an_ensemble.txt"
    other.write_text("hello")
    with pytest.raises(EnsembleExistsError):
        EnsembleWriter.create(other, make_meta())
    assert other.read_text() == "hello"

    with EnsembleWriter.create(path, make_meta(theory="u1"), force=True) as w:
        assert w.n_committed == 0
    with EnsembleReader(path) as r:
        assert r.theory == "u1" and r.n_committed == 0 and r.names("fields") == []
    assert verify(path) == []


def test_resume_continues_and_returns_latest_state(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, make_meta()) as w:
        w.append(make_rows(0, 2), state=b"first")
        w.append(make_rows(2, 3), state=b"second-and-longer" * 1000)
    w, state = EnsembleWriter.resume(path)
    with w:
        assert state == b"second-and-longer" * 1000
        assert w.n_committed == 5
        assert w.meta == make_meta()
        w.append(make_rows(5, 1), state=b"")  # empty blob is not None
    w, state = EnsembleWriter.resume(path)
    with w:
        assert state == b"" and w.n_committed == 6
        w.append(make_rows(6, 4), state=None)
        with pytest.raises(ValueError):  # keys stay fixed across resume
            w.append({"fields/phi": np.zeros((1, *SHAPE))})
    w, state = EnsembleWriter.resume(path)
    with w:
        assert state is None and w.n_committed == 10
        w.append(make_rows(10, 2), state=b"third")
    assert EnsembleWriter.resume(path)[1] == b"third"
    assert verify(path) == []
    with EnsembleReader(path) as r:
        check_rows(r, 12)

    # a fresh ensemble resumes at 0 with no state
    fresh = tmp_path / "fresh.h5"
    EnsembleWriter.create(fresh, make_meta()).close()
    w, state = EnsembleWriter.resume(fresh)
    with w:
        assert state is None and w.n_committed == 0
        w.append(make_rows(0, 1), state=b"x")
    assert verify(fresh) == []
    with pytest.raises(EnsembleError, match="missing.h5"):
        EnsembleWriter.resume(tmp_path / "missing.h5")


def test_interrupted_commit_is_discarded(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, make_meta()) as w:
        w.append(make_rows(0, 4), state=b"at 4")
    # a commit killed after writing rows: datasets longer, garbage, n_committed not raised
    with h5py.File(path, "r+") as f:
        for name in ("fields/phi", "markov/step", "weights/log_p", "observables/corr"):
            ds = f[name]
            ds.resize(7, axis=0)
            ds[4:7] = -99
        slot = f["checkpoint/state_1"]  # the slot not referenced by the commit at 4
        slot.resize(10, axis=0)
        slot[:10] = 0xFF
        slot.attrs.modify("n_committed", 7)  # ... and even a state that claims 7
        slot.attrs.modify("nbytes", 10)
    assert verify(path) == []
    with EnsembleReader(path) as r:
        check_rows(r, 4)
        assert r.read("fields/phi", slice(0, 100)).shape[0] == 4
    w, state = EnsembleWriter.resume(path)
    assert state == b"at 4"
    with w:
        assert w.n_committed == 4
        w.append(make_rows(4, 3), state=b"at 7")
    with h5py.File(path, "r") as f:
        assert f["fields/phi"].shape[0] == 7 and f["markov/chain"].shape[0] == 7
    assert verify(path) == []
    with EnsembleReader(path) as r:
        check_rows(r, 7)
    assert EnsembleWriter.resume(path)[1] == b"at 7"


def test_kill_between_checksum_and_n_committed(tmp_path: Path) -> None:
    """Checksums already cover the new rows but n_committed was not raised: still intact."""
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, make_meta()) as w:
        w.append(make_rows(0, 3), state=b"at 3")
        w.append(make_rows(3, 2), state=b"at 5")
    with h5py.File(path, "r+") as f:
        f.attrs.modify("n_committed", 3)
        assert f["fields/phi"].attrs["sha256_rows"] == 5
    assert verify(path) == []
    with EnsembleReader(path) as r:
        check_rows(r, 3)
    w, state = EnsembleWriter.resume(path)
    assert state == b"at 3"
    with w:
        w.append(make_rows(3, 1), state=b"at 4")
    with h5py.File(path, "r") as f:
        ds = f["fields/phi"]
        assert ds.attrs["sha256_rows"] == 4 and ds.attrs["sha256"].decode() == expected_sha(ds, 4)
    assert verify(path) == []
    assert EnsembleWriter.resume(path)[1] == b"at 4"


_KILL_CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from pathlib import Path
    from latflow.ensemble import EnsembleMeta, EnsembleWriter

    path = Path(sys.argv[1])
    shape = (4, 3)
    if path.exists():
        w, state = EnsembleWriter.resume(path)
        assert state == (b"s%d;" % w.n_committed) * (w.n_committed % 5 + 1), (state, w.n_committed)
    else:
        meta = EnsembleMeta(theory="phi4", couplings={"m2": -4.0}, lattice_shape=shape,
                            sampler={"kind": "hmc"}, seed=1)
        w = EnsembleWriter.create(path, meta)
    print("ready", flush=True)
    k = 0
    while True:
        n0, n = w.n_committed, 1 + k % 3
        i = np.arange(n0, n0 + n)
        rows = {
            "fields/phi": np.broadcast_to(i[:, None, None], (n, *shape)).astype(np.float64),
            "markov/chain": i % 2, "markov/step": i, "markov/accepted": (i % 2).astype(bool),
            "weights/log_p": i.astype(float), "weights/log_q": i.astype(float), "weights/log_w": i.astype(float),
            "observables/magnetization": i.astype(np.float32),
            "observables/corr": np.broadcast_to(i[:, None], (n, 3)).astype(np.float64),
        }
        w.append(rows, state=(b"s%d;" % (n0 + n)) * ((n0 + n) % 5 + 1))
        if k % 4 == 0:
            time.sleep(0.001 * (k % 7))
        k += 1
    """
)


def _kill_writer_repeatedly(tmp_path: Path, child: str, delays: tuple[float, ...], check) -> None:
    """Run the writer script `child` on one file, SIGKILL it after each delay (seconds) and check that
    the file verifies, grew, passes `check(reader, n_committed)` and resumes with the committed state."""
    script = tmp_path / "child.py"
    script.write_text(child)
    path = tmp_path / "killed.h5"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(latflow.__file__).parents[1]), *sys.path]))
    last_n = 0
    for delay in delays:
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == b"ready", line
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL  # killed, not finished or crashed on its own
        assert verify(path) == []
        with EnsembleReader(path) as r:
            assert r.n_committed > last_n
            check(r, r.n_committed)
            last_n = r.n_committed
        w, state = EnsembleWriter.resume(path)
        w.close()
        assert state == (b"s%d;" % last_n) * (last_n % 5 + 1)


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    """A writer killed with SIGKILL leaves an intact ensemble that resumes (three kills)."""
    _kill_writer_repeatedly(tmp_path, _KILL_CHILD, (0.83, 1.07, 1.31), check_rows)


def test_checksum_detects_flipped_byte(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, make_meta()) as w:
        w.append(make_rows(0, 5))
        w.append(make_rows(5, 2))
    with h5py.File(path, "r") as f:
        ds = f["fields/phi"]
        stored = ds.attrs["sha256"]
        stored = stored.decode() if isinstance(stored, bytes) else str(stored)
        assert stored == expected_sha(ds, 7) == sha256_of_rows(ds, 7)
    with h5py.File(path, "r+") as f:
        ds = f["fields/phi"]
        row = ds[3]
        b = bytearray(row.tobytes())
        b[5] ^= 0x10
        ds[3] = np.frombuffer(bytes(b), dtype=row.dtype).reshape(row.shape)
    problems = verify(path)
    assert len(problems) == 1
    assert "fields/phi" in problems[0] and "sha256" in problems[0] and str(path) in problems[0]
    assert "\n" not in problems[0]
    with pytest.raises(EnsembleError, match="fields/phi"):
        EnsembleWriter.resume(path)  # refuses to append to a damaged ensemble

    with h5py.File(path, "r+") as f:
        del f["fields/phi"].attrs["sha256"]
    assert any("fields/phi" in p and "no sha256" in p for p in verify(path))


def test_sha256_of_rows_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        big = f.create_dataset("big", data=rng.normal(size=(37, 5, 3)).astype(">f4"))  # big-endian stored
        cplx = f.create_dataset("c", data=rng.normal(size=(11, 2, 2)) + 1j * rng.normal(size=(11, 2, 2)))
        flags = f.create_dataset("b", data=rng.random(9) < 0.5)
        monkeypatch.setattr(ens._h5, "_HASH_BLOCK_BYTES", 100)  # many small blocks
        for ds in (big, cplx, flags):
            for n in (0, 1, ds.shape[0] // 2, ds.shape[0]):
                assert sha256_of_rows(ds, n) == expected_sha(ds, n)
        with pytest.raises(ValueError):
            sha256_of_rows(big, 38)


def _foreign(path: Path, *, n_committed: bool = True, contiguous: bool = True) -> None:
    """A file written by another program: plain h5py, bytes attributes, float32, no checkpoint."""
    n = 6
    i = np.arange(n)
    phi = np.broadcast_to(i[:, None, None], (n, *SHAPE)).astype(np.float32)
    with h5py.File(path, "w") as f:
        a = f.attrs
        a["format"] = np.bytes_(b"latflow-ensemble")
        a["format_version"] = np.int32(1)
        a["latflow_version"] = np.bytes_(b"0.0.1-other")
        a["created_utc"] = np.bytes_(b"2020-01-01T00:00:00Z")
        a["theory"] = np.bytes_(b"phi4")
        a["couplings"] = np.bytes_(json.dumps({"m2": -4.0, "lam": 8.0}).encode())
        a["lattice_shape"] = np.array(SHAPE, dtype=np.int32)
        a["sampler"] = json.dumps({"kind": "hmc", "tau": 1.0})
        a["seed"] = np.uint32(7)
        a["job"] = np.bytes_(b"")
        a["model_sha256"] = ""
        a["comment"] = "written by hand"
        if n_committed:
            a["n_committed"] = np.int32(5)  # one uncommitted row at the end
        kw = {} if contiguous else {"chunks": True, "maxshape": (None,)}
        kwf = {} if contiguous else {"chunks": True, "maxshape": (None, *SHAPE)}
        ds = f.create_dataset("fields/phi", data=phi, **kwf)
        ds.attrs["sha256"] = np.bytes_(expected_sha(ds, 5 if n_committed else n).encode())
        f.create_dataset("markov/chain", data=np.zeros(n, dtype=np.int32), **kw)
        f.create_dataset("markov/step", data=i.astype(np.int32), **kw)
        f.create_dataset("markov/accepted", data=np.ones(n, dtype=bool), **kw)
        f.create_dataset("weights/log_p", data=i.astype(np.float32), **kw)
        f.create_dataset("observables/plaquette", data=i.astype(np.float64), **kw)
        f.create_dataset("extra/notes", data=np.arange(3))
        f.create_group("extra/empty")


def test_foreign_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "foreign.h5"
    _foreign(path)
    assert verify(path) == []
    with EnsembleReader(path) as r:
        assert r.n_committed == 5
        assert r.theory == "phi4" and r.couplings == {"m2": -4.0, "lam": 8.0}
        assert r.sampler == {"kind": "hmc", "tau": 1.0} and r.seed == 7 and r.lattice_shape == SHAPE
        assert r.attrs["format"] == "latflow-ensemble" and r.attrs["comment"] == "written by hand"
        assert type(r.attrs["format_version"]) is int and type(r.attrs["seed"]) is int
        phi = r.read("fields/phi")
        assert phi.dtype == np.float32 and phi.shape == (5, *SHAPE)
        np.testing.assert_array_equal(phi[:, 0, 0], np.arange(5))
        np.testing.assert_array_equal(r.read("markov/step", slice(1, None, 2)), [1, 3])
        assert r.names("fields") == ["phi"] and r.names("extra") == ["notes"] and r.names("checkpoint") == []
        np.testing.assert_array_equal(r.read("extra/notes"), np.arange(3))


def test_foreign_file_without_n_committed(tmp_path: Path) -> None:
    path = tmp_path / "foreign.h5"
    _foreign(path, n_committed=False)
    with EnsembleReader(path) as r:
        assert r.n_committed == 6 and "n_committed" not in r.attrs
        np.testing.assert_array_equal(r.read("weights/log_p"), np.arange(6))
    assert any("n_committed" in p for p in verify(path))


def test_foreign_chunked_file_can_be_resumed(tmp_path: Path) -> None:
    path = tmp_path / "foreign.h5"
    _foreign(path, contiguous=False)
    w, state = EnsembleWriter.resume(path)
    assert state is None
    with w:
        assert w.n_committed == 5
        i = np.array([5, 6])
        w.append(
            {
                "fields/phi": np.broadcast_to(i[:, None, None], (2, *SHAPE)).astype(np.float32),
                "markov/chain": np.zeros(2, dtype=np.int64),
                "markov/step": i,
                "markov/accepted": np.ones(2, dtype=bool),
                "weights/log_p": i.astype(np.float32),
                "observables/plaquette": i.astype(np.float64),
            },
            state=b"now with state",
        )
    assert verify(path) == []
    with EnsembleReader(path) as r:
        np.testing.assert_array_equal(r.read("fields/phi")[:, 0, 0], np.arange(7))
        assert r.read("markov/step").dtype == np.int32  # the foreign file's dtypes are kept
    assert EnsembleWriter.resume(path)[1] == b"now with state"
    # contiguous datasets cannot grow
    contiguous = tmp_path / "contig.h5"
    _foreign(contiguous)
    with pytest.raises(EnsembleError, match="contig.h5.*not resizable"):
        EnsembleWriter.resume(contiguous)


def test_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_bytes(b"this is not HDF5\n" * 10)
    missing = tmp_path / "missing.h5"
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    for p, what in ((text, "not an HDF5 file"), (missing, "no such file"), (plain, "not a latflow ensemble")):
        with pytest.raises(EnsembleError) as info:
            EnsembleReader(p)
        msg = str(info.value)
        assert str(p) in msg and what in msg and "\n" not in msg
        problems = verify(p)
        assert problems and all(str(p) in q and "\n" not in q for q in problems)

    wrong_version = tmp_path / "v2.h5"
    EnsembleWriter.create(wrong_version, make_meta()).close()
    with h5py.File(wrong_version, "r+") as f:
        f.attrs["format_version"] = 2
        del f.attrs["job"]
    problems = verify(wrong_version)
    assert any("format_version" in p for p in problems) and any("'job'" in p for p in problems)
    with pytest.raises(EnsembleError, match="v2.h5"):
        EnsembleReader(wrong_version)


def test_verify_reports_short_datasets(tmp_path: Path) -> None:
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, make_meta()) as w:
        w.append(make_rows(0, 4))
    with h5py.File(path, "r+") as f:
        f.attrs.modify("n_committed", 6)
    problems = verify(path)
    for name in ("fields/phi", "markov/step", "weights/log_q", "observables/corr"):
        assert any(name in p and "rows < n_committed" in p for p in problems), name
    with EnsembleReader(path) as r, pytest.raises(EnsembleError, match="fields/phi"):
        r.read("fields/phi")


# --- configurations stored every save_every rows (fields/row), compression ----------------------

THIN = {"save_every": 3, "compression": "gzip", "compression_level": 6}


def make_thinned_rows(start: int, n: int, every: int = 3) -> dict[str, np.ndarray]:
    """``make_rows`` with the configurations of rows ``i`` where ``(i + 1) % every == 0`` only."""
    rows = make_rows(start, n)
    i = np.arange(start, start + n)
    keep = (i + 1) % every == 0
    rows["fields/phi"] = rows["fields/phi"][keep]
    rows["fields/row"] = i[keep]
    return rows


def check_thinned(r: EnsembleReader, n: int, every: int = 3) -> None:
    """Rows 0..n-1 everywhere; configurations only of the rows i with (i + 1) % every == 0."""
    assert r.n_committed == n
    kept = np.arange(every - 1, n, every)
    np.testing.assert_array_equal(r.read("fields/row"), kept)
    np.testing.assert_array_equal(r.read("fields/phi"), np.broadcast_to(kept[:, None, None], (len(kept), *SHAPE)))
    i = np.arange(n)
    np.testing.assert_array_equal(r.read("markov/step"), i)
    np.testing.assert_array_equal(r.read("observables/magnetization"), i)


def test_thinned_compressed_round_trip_and_resume(tmp_path: Path) -> None:
    path = tmp_path / "thin.h5"
    attrs = {"observables/magnetization": {"description": "M = (1/V) sum_x phi_x", "estimator": "exact"}}
    with EnsembleWriter.create(path, make_meta(storage=THIN), dataset_attrs=attrs) as w:
        n = 0
        for k in (1, 1, 4, 2, 5):  # the first two commits store no configuration
            w.append(make_thinned_rows(n, k), state=b"at %d" % (n + k))
            n += k
    assert verify(path) == []
    with EnsembleReader(path) as r:
        check_thinned(r, 13)
        assert r.meta.storage == THIN and r.meta.storage_settings == THIN
    with h5py.File(path, "r") as f:
        phi = f["fields/phi"]
        assert phi.compression == "gzip" and phi.compression_opts == 6 and phi.shuffle
        assert phi.chunks[0] == 1  # one configuration per chunk: a compressed chunk is written once
        assert phi.attrs["sha256"].decode() == expected_sha(phi, 4)  # over the values, not the compressed bytes
        assert int(phi.attrs["sha256_rows"]) == 4
        assert f["fields/row"].attrs["sha256"].decode() == expected_sha(f["fields/row"], 4)
        assert "save_every" in f["fields/row"].attrs["description"]
        mag = f["observables/magnetization"]
        assert mag.attrs["description"] == "M = (1/V) sum_x phi_x" and mag.attrs["estimator"] == "exact"
        assert "unnormalised" in f["observables"].file["weights/log_p"].attrs["description"]
        assert json.loads(f.attrs["storage"]) == THIN

    # an interrupted commit: rows and configurations written, n_committed not raised
    with h5py.File(path, "r+") as f:
        for name in ("markov/step", "observables/magnetization", "fields/row", "fields/phi"):
            f[name].resize(f[name].shape[0] + 3, axis=0)
        f["fields/row"][-3:] = [14, 17, 20]
        f["fields/phi"][-3:] = -99
    assert verify(path) == []
    with EnsembleReader(path) as r:
        check_thinned(r, 13)
    w, state = EnsembleWriter.resume(path)
    assert state == b"at 13"
    with w:
        w.append(make_thinned_rows(13, 8), state=b"at 21")
    assert verify(path) == []
    with EnsembleReader(path) as r:
        check_thinned(r, 21)
    # the same rows written in one go: identical datasets and checksums
    one = tmp_path / "one.h5"
    with EnsembleWriter.create(one, make_meta(storage=THIN)) as w:
        w.append(make_thinned_rows(0, 21), state=b"at 21")
    with h5py.File(path, "r") as a, h5py.File(one, "r") as b:
        for name in ("fields/phi", "fields/row"):
            assert a[name].shape == b[name].shape and a[name].attrs["sha256"] == b[name].attrs["sha256"]


def test_thinned_append_validation(tmp_path: Path) -> None:
    with EnsembleWriter.create(tmp_path / "v.h5", make_meta(storage=THIN)) as w:
        w.append(make_thinned_rows(0, 3))
        bad = make_thinned_rows(3, 6)
        bad["fields/row"] = bad["fields/row"][::-1].copy()
        with pytest.raises(ValueError, match="strictly increasing"):
            w.append(bad)
        bad = make_thinned_rows(3, 6)
        bad["fields/row"] = bad["fields/row"] - 3  # rows of the previous commit
        with pytest.raises(ValueError, match=r"\[3, 9\)"):
            w.append(bad)
        bad = make_thinned_rows(3, 6)
        bad["fields/phi"] = bad["fields/phi"][:1]
        with pytest.raises(ValueError, match="configurations"):
            w.append(bad)
        w.append(make_thinned_rows(3, 6))
        assert w.n_committed == 9
    for storage in ({"save_every": 0}, {"compression": "zstd"}, {"compression_level": 11}, {"every": 2}):
        with pytest.raises(ValueError, match="storage"):
            EnsembleWriter.create(tmp_path / "x.h5", make_meta(storage=storage))
    assert not (tmp_path / "x.h5").exists()


_KILL_THINNED_CHILD = _KILL_CHILD.replace(
    'sampler={"kind": "hmc"}, seed=1)',
    'sampler={"kind": "hmc"}, seed=1, storage={"save_every": 3, "compression": "gzip"})',
).replace(
    "    w.append(rows,",
    "    keep = (i + 1) % 3 == 0\n"
    '    rows["fields/phi"] = rows["fields/phi"][keep]\n'
    '    rows["fields/row"] = i[keep]\n'
    "    w.append(rows,",
)


def test_thinned_compressed_writer_survives_sigkill(tmp_path: Path) -> None:
    """With fields/row and gzip'd one-configuration chunks, SIGKILL at any moment leaves an intact file."""
    assert "fields/row" in _KILL_THINNED_CHILD and "gzip" in _KILL_THINNED_CHILD
    _kill_writer_repeatedly(tmp_path, _KILL_THINNED_CHILD, (0.71, 0.97), check_thinned)


def test_the_format_document_describes_what_the_writer_stores(tmp_path: Path) -> None:
    """ENSEMBLE_FORMAT.md (repository root) names every root attribute and dataset a writer creates."""
    doc = (Path(__file__).resolve().parents[1] / "ENSEMBLE_FORMAT.md").read_text(encoding="utf-8")
    path = tmp_path / "e.h5"
    with EnsembleWriter.create(path, make_meta(storage=THIN)) as w:
        rows = make_thinned_rows(0, 6)
        rows["weights/proposal_log_w"] = rows["weights/log_p"]
        w.append(rows)
    with h5py.File(path, "r") as f:
        for name in f.attrs:
            assert f"`{name}`" in doc, f"root attribute {name} is not documented"
        for group in ens.ROW_GROUPS:
            for name, ds in f[group].items():
                if group != "observables":  # observables are the theory's: described by the runner
                    assert f"`{group}/{name}`" in doc, f"{group}/{name} is not documented"
                    assert ds.attrs.get("description"), f"{group}/{name} has no description"
        assert "`checkpoint/state_0`" in doc and "`n_committed`" in doc
