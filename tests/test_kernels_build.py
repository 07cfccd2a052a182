"""The kernel build machinery (latflow.kernels.build): compile, cache, disable, fall back with one warning."""

import ctypes
import os
import subprocess
import sys
import warnings

import pytest

from latflow.kernels import build

SOURCE = 'extern "C" int latflow_add(int a, int b) { return a + b; }\n'


@pytest.fixture
def toy_kernel(tmp_path, monkeypatch):
    """A one-function kernel source in a temporary source dir, a private cache dir and a clean memo."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "toy.cpp").write_text(SOURCE)
    monkeypatch.setattr(build, "SOURCE_DIR", src)
    monkeypatch.setenv("LATFLOW_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LATFLOW_KERNELS", raising=False)
    build.clear_memo()
    yield tmp_path
    build.clear_memo()


def test_build_then_cache(toy_kernel):
    lib = build.load("toy")
    if lib is None:
        pytest.skip("no working C++ compiler on this machine")
    lib.latflow_add.restype = ctypes.c_int
    assert lib.latflow_add(2, 3) == 5
    assert build.status("toy").startswith("built")
    assert build.load("toy") is lib  # memoised
    libs = list((toy_kernel / "cache" / "kernels").glob("toy-*.so"))
    assert len(libs) == 1
    assert not list((toy_kernel / "cache" / "kernels").glob(".toy-*"))  # no temporary left behind
    build.clear_memo()
    assert build.load("toy") is not None
    assert build.status("toy").startswith("cached")
    assert build.available("toy")


def test_disabled_by_env(toy_kernel, monkeypatch):
    monkeypatch.setenv("LATFLOW_KERNELS", "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # disabling on purpose is silent
        assert build.load("toy") is None
    assert not build.available("toy")
    assert not (toy_kernel / "cache" / "kernels").exists()


def test_missing_compiler_warns_once(toy_kernel, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match="unavailable") as record:
        assert build.load("toy") is None
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build.load("toy") is None  # memoised failure, no second warning
    assert build.status("toy").startswith("unavailable")


def test_compile_error_names_first_error_line(toy_kernel):
    (build.SOURCE_DIR / "broken.cpp").write_text("this is not C++\n")
    with pytest.warns(RuntimeWarning, match="broken.cpp.*error") as record:
        assert build.load("broken") is None
    assert len(record) == 1


def test_cli_lists_kernels(tmp_path):
    env = dict(os.environ, LATFLOW_CACHE_DIR=str(tmp_path), LATFLOW_KERNELS="off")
    res = subprocess.run([sys.executable, "-m", "latflow.kernels"], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    for name in build.kernel_names():
        assert f"{name}: unavailable (LATFLOW_KERNELS=off)" in res.stdout
