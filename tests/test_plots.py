"""Figures of analysis/plots.py: each one written, not blank, and with labelled axes and titles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import stat_seed
from matplotlib.figure import Figure
from matplotlib.image import imread
from scipy.signal import lfilter

from latflow.analysis import gamma_method, plots

#: the pixel variance of a white page is 0; a figure with axes, text and data is far above this
MIN_PIXEL_VARIANCE = 1e-3


def _ar1(rng: np.random.Generator, n: int, a: float) -> np.ndarray:
    return lfilter([1.0], [1.0, -a], rng.standard_normal(n))


def assert_labelled(fig: Figure) -> None:
    """Every axes of ``fig`` has an x label, a y label and a title."""
    assert fig.axes
    for ax in fig.axes:
        assert ax.get_xlabel().strip(), f"axes without x label: {ax.get_title()!r}"
        assert ax.get_ylabel().strip(), f"axes without y label: {ax.get_title()!r}"
        assert ax.get_title().strip(), "axes without title"


def assert_png_not_blank(path: Path) -> np.ndarray:
    """The PNG exists, is an image of reasonable size, and is not one flat colour; returns its pixels."""
    assert path.is_file() and path.stat().st_size > 1000
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].var()) > MIN_PIXEL_VARIANCE
    return img


def _save_and_check(fig: Figure, path: Path) -> None:
    assert_labelled(fig)
    (png,) = plots.save_figure(fig, path)
    assert png == path.with_suffix(".png")
    assert_png_not_blank(png)


@pytest.fixture(scope="module")
def chains() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [_ar1(rng, 400, 0.8), _ar1(rng, 300, 0.8)]


def test_history_histogram_and_pdf(tmp_path, chains):
    fig = plots.plot_history(chains, "plaquette", steps=[np.arange(c.size) + 10 for c in chains])
    assert len(fig.axes[0].lines) == 2  # one line per chain
    _save_and_check(fig, tmp_path / "history.png")
    fig = plots.plot_histogram(np.concatenate(chains), "plaquette")
    assert len(fig.axes[0].patches) > 5
    written = plots.save_figure(fig, tmp_path / "hist", formats=("png", "pdf"))
    assert [p.suffix for p in written] == [".png", ".pdf"]
    assert written[1].read_bytes()[:5] == b"%PDF-" and written[1].stat().st_size > 1000
    assert_png_not_blank(written[0])
    with pytest.raises(ValueError, match="'png' or 'pdf'"):
        plots.save_figure(fig, tmp_path / "x", formats=("svg",))
    (blank,) = plots.save_figure(Figure(), tmp_path / "blank")  # the check can fail: a blank page
    assert float(imread(blank)[..., :3].var()) < MIN_PIXEL_VARIANCE


def test_charge_histogram_has_integer_bars(tmp_path):
    rng = np.random.default_rng(3)
    q = rng.integers(-3, 4, size=500) + rng.normal(0, 1e-6, size=500)  # geometric Q: integer up to rounding
    fig = plots.plot_charge_histogram(q, exact={k: math.exp(-(k**2) / 4) / 3.5 for k in range(-3, 4)})
    bars = fig.axes[0].patches
    assert sorted(round(b.get_x() + b.get_width() / 2, 9) for b in bars) == list(range(-3, 4))
    assert sum(b.get_height() for b in bars) == pytest.approx(1.0)
    _save_and_check(fig, tmp_path / "q.png")


def test_autocorrelation_agrees_with_gamma_method(tmp_path, chains):
    acf = plots.autocorrelation(chains)
    res = gamma_method(chains)
    assert acf.rho[0] == pytest.approx(1.0)
    assert acf.window == res.window and acf.n == res.n == 700
    # gamma_method reports tau_int(W) with Wolff's bias correction (analysis/gamma.py)
    corr = (1 + (2 * acf.window + 1) / acf.n) / (1 + 1 / acf.n)
    assert acf.tau_int[acf.window] * corr == pytest.approx(res.tau_int, rel=1e-10)
    assert acf.rho[1] == pytest.approx(0.8, abs=0.1)  # AR(1) with a = 0.8
    fig = plots.plot_autocorrelation(acf, "plaquette")
    window_lines = [ln for ln in fig.axes[0].lines if list(ln.get_xdata()) == [acf.window, acf.window]]
    assert window_lines, "the chosen window is not marked"
    _save_and_check(fig, tmp_path / "rho.png")
    fig = plots.plot_tau_int(acf, "plaquette")
    _save_and_check(fig, tmp_path / "tau.png")
    # constant data (a frozen chain; its mean is not exact in floating point): no autocorrelation
    flat = plots.autocorrelation([np.full(50, 0.28850951), np.full(30, 0.28850951)])
    assert flat.rho[0] == 1.0 and not flat.rho[1:].any()


def test_training_curves(tmp_path):
    steps = list(range(0, 200, 2))
    history = {
        "step": steps,
        "loss": [10 * math.exp(-s / 50) - 3 for s in steps],
        "ess": [1 - math.exp(-s / 40) for s in steps],
        "kl": [None if s < 20 else 10 * math.exp(-s / 50) for s in steps],
        "lr": [1e-3] * len(steps),
        "acceptance": [0.8 * (1 - math.exp(-s / 30)) for s in steps],
    }
    fig = plots.plot_training(history)
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "KL(q || p) (nats)", "ESS fraction", "acceptance"]
    assert fig.axes[1].lines[0].get_xdata()[0] == 20  # KL only where log Z was known
    _save_and_check(fig, tmp_path / "train.png")
    craft = {"log_z": [0.1, 0.2, 0.25], "ess": [0.5, 0.7, 0.8], "loss": [3.0, 2.0, 1.5]}  # CRAFT: per iteration
    fig = plots.plot_training(craft)
    assert [ax.get_xlabel() for ax in fig.axes] == ["iteration"] * 3
    _save_and_check(fig, tmp_path / "craft.png")
    with pytest.raises(ValueError, match="no finite"):
        plots.plot_training({"kl": [None, None]})


@pytest.mark.statistical
def test_correlator_and_effective_mass(tmp_path, record_z):
    rng = np.random.default_rng(stat_seed(71))
    n, T, mass = 400, 8, 0.5
    t = np.arange(T)
    exact = np.cosh(mass * (t - T / 2))  # periodic correlator: log-ratio m_eff(t) = log(C(t)/C(t+1))
    noise = 1 + 0.05 * rng.standard_normal((n, T))
    corr = exact * noise
    est = plots.correlator_estimate([corr[:200], corr[200:]])
    z = (est.mean - exact) / est.err
    assert np.all(np.abs(z) < 4), z  # 8 components: max |z| < 4 fails at under 0.1%
    m1 = math.log(exact[1] / exact[2])
    z1 = (est.m_eff[1] - m1) / est.m_eff_err[1]
    record_z("m_eff(1)", z1)
    assert abs(z1) < 3
    fig = plots.plot_correlator(est, "pion_correlator")
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    _save_and_check(fig, tmp_path / "corr.png")
    neg = plots.correlator_estimate([np.sin(t)[None, :] + 0.1 * rng.standard_normal((50, T))])
    assert np.isnan(neg.m_eff).any()  # no effective mass where C(t) is not positive
    assert_labelled(plots.plot_correlator(neg, "sin"))


def test_weights(tmp_path):
    rng = np.random.default_rng(9)
    lw = rng.normal(0, 1.5, size=2000)
    lw[:3] = np.nan  # left out
    fig = plots.plot_weights(lw, "proposal log w", ess=0.31)
    assert "0.31" in fig.axes[0].get_title() and "1997 finite" in fig.axes[0].get_title()
    _save_and_check(fig, tmp_path / "w.png")
    fig = plots.plot_weights(lw, "log w", run_ess=rng.uniform(0.2, 0.9, size=16))
    assert len(fig.axes) == 2
    _save_and_check(fig, tmp_path / "w_runs.png")
