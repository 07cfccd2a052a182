"""2D U(1) topology: flow-MCMC with the plaquette prior against the fair HMC, in one process.

Four parts, each printed as one table (machine, torch version and date in the header):

1. **HMC** (the fair baseline of ``benchmarks/u1_topology.py``, whose kernel and timing functions are
   reused): Omelyan, trajectory length 1 with the fewest steps per unit trajectory reaching 85%
   acceptance, 10% step jitter, chains batched. For beta in ``--betas`` and L in ``--Ls``: seconds per
   trajectory per chain in float32 and float64 at the fastest of ``--hmc-batches``; ``tau_int(Q)`` from
   ``--hmc-chains`` float32 chains that *start from exact samples* (:func:`latflow.theories.u1.sample_exact_2d`),
   so no thermalisation is needed and every trajectory counts, analysed as Gamma-method replicas with the
   known ``<Q> = 0``. The chains run for ``--hmc-seconds`` of wall time per point; when they are shorter than
   ~20 tau_int the Gamma value is a lower bound (HMC looks better: conservative for the flow). A second,
   model-based estimate needs only one-trajectory increments: for a charge that diffuses in a quadratic
   well (Ornstein-Uhlenbeck), ``tau_int = 2 <Q^2> / <(Q_{t+1} - Q_t)^2>`` with the exact ``<Q^2>``; it
   ignores back-and-forth jumps of Q (which inflate the increment), so it also errs on HMC's side.
   ``--hmc-tau-from-table`` skips the measurement and uses the L = 16 values of BENCHMARKS.md at every L.
2. **Flow-MCMC with the plaquette prior alone** (:class:`latflow.plaquette_prior.U1PlaquettePrior`, no
   training): ms per proposal at the fastest of ``--flow-batches``, acceptance, ESS per proposal,
   ``tau_int(Q)`` of a chain of ``--flow-steps`` steps (Gamma method, known mean), plaquette and ``<Q^2>``
   against the exact values (z-scores), cost per independent Q = ms per step x 2 tau_int, HMC / flow.
3. **Ablations** at L = ``--ablation-L`` for beta in ``--ablation-betas``, each model trained for the same
   wall time ``--train-seconds`` (amortised over ``--amortise`` configurations): (a) Haar prior + reverse KL
   (reparametrisation gradients), (b) Haar + path gradients, (c) the plaquette prior alone (no training),
   (d) the plaquette prior + ``--d-layers`` gauge-equivariant couplings (zero-initialised, so they start
   as the prior) trained with ``--d-estimator``. For each: acceptance, ESS, the true reverse KL in nats
   (``mean(log q + S) + log Z`` in the Lebesgue measure of ``log q``: ``log Z_Haar + 2V log 2 pi``),
   ms per proposal, cost per independent Q with the training amortised, HMC / flow.
4. A plot of cost per independent Q against L (HMC and the plaquette-prior flow, both betas, log scale)
   and of the ESS per proposal, ``benchmarks/figures/u1_plaquette_prior_cost.png``.

Usage::

    python benchmarks/u1_plaquette_prior.py --quick                # a minute; checks the script runs
    python benchmarks/u1_plaquette_prior.py --json out.json        # the BENCHMARKS.md run
    python benchmarks/u1_plaquette_prior.py --hmc-tau-from-table   # HMC timing only, tau_int(Q) from the L = 16 table
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from u1_topology import omelyan_hmc, time_hmc  # noqa: E402

from latflow.analysis import ess, gamma_method  # noqa: E402
from latflow.flows.gauge_layers import make_u1_equivariant_flow  # noqa: E402
from latflow.gauge import u1_plaquette_angles  # noqa: E402
from latflow.lattice import Lattice  # noqa: E402
from latflow.plaquette_prior import U1PlaquettePrior  # noqa: E402
from latflow.rng import make_generator  # noqa: E402
from latflow.samplers import FlowMCMC  # noqa: E402
from latflow.theories.u1 import (  # noqa: E402
    U1GaugeAction,
    U1Params,
    exact_plaquette,
    exact_q2,
    sample_exact_2d,
    topological_charge,
)
from latflow.training import ReverseKLTrainer  # noqa: E402

# HMC tau_int(Q) at L = 16 measured by benchmarks/u1_topology.py (BENCHMARKS.md, 64 chains, known mean)
TAU_TABLE_L16 = {6.0: (1371.0, 167.0), 7.0: (6598.0, 873.0)}
BLOCK_BYTES = 1e8  # memory of one block of stored configurations


def q_and_plaquette(theta: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Rounded geometric charge and mean plaquette ``cos theta_p`` of links ``[..., 2, L0, L1]``, each ``[...]``."""
    lead = theta.shape[:-3]
    th = theta.reshape(-1, *theta.shape[-3:]).double()
    q = topological_charge(th).round().reshape(lead).numpy()
    plaq = torch.cos(u1_plaquette_angles(th)).flatten(1).mean(dim=1).reshape(lead).numpy()
    return q, plaq


def z_score(value: float, err: float, exact: float) -> float:
    return (value - exact) / err if err > 0 else float("nan")


# --- part 1: HMC -------------------------------------------------------------------------------------------


@dataclass
class HMCPoint:
    beta: float
    L: int
    n_steps: int
    acceptance: float
    batch32: int  # fastest timing batch, float32
    ms32: float  # per trajectory per chain
    batch64: int
    ms64: float
    tau_source: str  # "measured" or "table (L = 16)"
    tau_q: float
    tau_q_err: float
    tau_ou: float  # 2 <Q^2>_exact / <dQ^2>
    n_chains: int
    n_traj: int  # per chain
    short: bool  # chains shorter than 20 tau_int: tau_q is a lower bound
    plaquette: float
    plaquette_err: float
    q2: float
    q2_err: float

    @property
    def ms_per_indep(self) -> float:
        return self.ms32 * 2 * self.tau_q

    @property
    def ms_per_indep_ou(self) -> float:
        return self.ms32 * 2 * self.tau_ou


def tune_steps(theory: U1GaugeAction, x0: torch.Tensor, n_traj: int, seed: int) -> tuple[int, float]:
    """Fewest Omelyan steps per unit trajectory (3 ... 16) reaching 85% acceptance on equilibrium chains ``x0``."""
    gen = make_generator(seed, 12, int(theory.beta * 10), theory.lattice.shape[0])
    acc = 0.0
    for n in (3, 4, 5, 6, 7, 8, 10, 12, 14, 16):
        hmc = omelyan_hmc(theory, x0, 1.0 / n, n, gen)
        acc = hmc.run(n_traj).accepted.float().mean().item()
        if acc >= 0.85:
            return n, acc
    return n, acc


def fastest_batch(
    theory: U1GaugeAction, x0: torch.Tensor, n_steps: int, dtype: torch.dtype, batches: list[int], args
) -> tuple[int, float, float]:
    """``(batch, seconds per trajectory per chain, acceptance)`` at the fastest batch."""
    best = (0, math.inf, 0.0)
    v2 = 2 * theory.lattice.volume
    for b in batches:
        n_traj = int(min(args.hmc_time_traj, max(5, BLOCK_BYTES / (b * v2 * 8))))
        ns = argparse.Namespace(seed=args.seed, hmc_time_chains=b, hmc_time_traj=n_traj)
        dt, acc = time_hmc(theory, x0, n_steps, dtype, ns)
        if dt < best[1]:
            best = (b, dt, acc)
    return best


def hmc_point(beta: float, L: int, args: argparse.Namespace) -> HMCPoint:
    lat = Lattice((L, L))
    theory = U1GaugeAction(U1Params(beta), lat)
    shape = (L, L)
    gen = make_generator(args.seed, 1, int(10 * beta), L)
    x0 = sample_exact_2d(beta, shape, args.hmc_chains, gen)  # [C, 2, L, L] float64, equilibrium
    n_tune_chains = min(args.hmc_chains, 32)
    n_steps, _ = tune_steps(theory, x0[:n_tune_chains], args.hmc_tune, args.seed)
    b64, t64, _ = fastest_batch(theory, x0, n_steps, torch.float64, args.hmc_batches, args)
    b32, t32, _ = fastest_batch(theory, x0, n_steps, torch.float32, args.hmc_batches, args)
    eq2 = exact_q2(beta, shape)
    if args.hmc_tau_from_table:
        tau, dtau = TAU_TABLE_L16[beta]
        return HMCPoint(
            beta, L, n_steps, float("nan"), b32, 1e3 * t32, b64, 1e3 * t64, "table (L = 16)", tau, dtau,
            float("nan"), 0, 0, False, float("nan"), 0.0, float("nan"), 0.0,
        )  # fmt: skip
    # float32 links, float64 Hamiltonian: the chains of the timing, started from exact samples
    hmc = omelyan_hmc(theory, x0.float(), 1.0 / n_steps, n_steps, make_generator(args.seed, 11, int(10 * beta), L))
    q0, _ = q_and_plaquette(x0)
    qs, ps, acc = [q0[None, :]], [], []
    block = int(max(1, min(200, BLOCK_BYTES / (args.hmc_chains * 2 * lat.volume * 4))))
    t0 = time.perf_counter()
    n_traj = 0
    while time.perf_counter() - t0 < args.hmc_seconds or n_traj < 2 * block:
        blk = hmc.run(block)
        q, p = q_and_plaquette(blk.x.reshape(block, -1, *blk.x.shape[1:]))  # [block, C]
        qs.append(q)
        ps.append(p)
        acc.append(blk.accepted.float().mean().item())
        n_traj += block
    qa = np.concatenate(qs)  # [1 + n_traj, C], row 0 the exact start
    pa = np.concatenate(ps)
    rq = gamma_method([qa[1:, c] for c in range(qa.shape[1])], known_mean=0.0)
    rp = gamma_method([pa[:, c] for c in range(pa.shape[1])])
    rq2 = gamma_method([qa[1:, c] ** 2 for c in range(qa.shape[1])])
    dq2 = float(np.mean(np.diff(qa, axis=0) ** 2))
    tau_ou = 2 * eq2 / dq2 if dq2 > 0 else math.inf
    return HMCPoint(
        beta, L, n_steps, float(np.mean(acc)), b32, 1e3 * t32, b64, 1e3 * t64, "measured", rq.tau_int,
        rq.tau_int_err, tau_ou, args.hmc_chains, n_traj, n_traj < 20 * max(rq.tau_int, tau_ou), rp.mean, rp.err,
        rq2.mean, rq2.err,
    )  # fmt: skip


# --- part 2 and 3: flow-MCMC ---------------------------------------------------------------------------------


@dataclass
class FlowPoint:
    label: str
    beta: float
    L: int
    train_seconds: float
    train_steps: int
    kl: float  # true reverse KL, nats
    kl_err: float
    batch: int
    ms_per_proposal: float
    acceptance: float
    n_accepted: int
    ess: float  # per proposal, from the chain's proposals
    tau_q: float
    tau_q_err: float
    n_steps: int
    plaquette: float
    plaquette_err: float
    q2: float
    q2_err: float
    amortise: float

    @property
    def ms_per_indep(self) -> float:
        return self.ms_per_proposal * 2 * self.tau_q + 1e3 * self.train_seconds / self.amortise


def log_z_lebesgue(beta: float, lat: Lattice) -> float:
    """``log Z`` of ``exp(-S)`` with the Lebesgue measure on ``(-pi, pi]^{2V}`` (the measure of ``log q``)."""
    theory = U1GaugeAction(U1Params(beta), lat)
    return theory.exact_log_z() + theory.field_log_volume()


def true_kl(model, theory: U1GaugeAction, n: int, batch: int, gen: torch.Generator) -> tuple[float, float]:
    """Reverse KL ``E_q[log q + S] + log Z`` in nats and its standard error from ``n`` fresh proposals."""
    vals = []
    with torch.no_grad():
        for i in range(0, n, batch):
            x, log_q = model.sample(min(batch, n - i), gen)
            vals.append((log_q.double() + theory.action(x.double())).numpy())
    v = np.concatenate(vals)
    return float(v.mean() + log_z_lebesgue(theory.beta, theory.lattice)), float(v.std(ddof=1) / math.sqrt(v.size))


def fastest_flow_batch(model, theory: U1GaugeAction, batches: list[int], gen: torch.Generator) -> int:
    """The batch with the least time per proposal (``sample`` plus the action)."""
    best, best_dt = batches[0], math.inf
    with torch.no_grad():
        for b in batches:
            model.sample(min(b, 64), gen)
            reps = max(1, 4096 // b)
            t0 = time.perf_counter()
            for _ in range(reps):
                x, _ = model.sample(b, gen)
                theory.action(x)
            dt = (time.perf_counter() - t0) / (reps * b)
            if dt < best_dt:
                best, best_dt = b, dt
    return best


def flow_chain(
    label: str,
    model,
    beta: float,
    L: int,
    n_steps: int,
    batches: list[int],
    args,
    train_s=0.0,
    train_steps=0,
    max_seconds: float = math.inf,
) -> FlowPoint:
    """Flow-MCMC chain of ``n_steps`` steps in blocks, or fewer if sampling takes longer than ``max_seconds``;
    observables per block (memory stays flat)."""
    lat = Lattice((L, L))
    theory = U1GaugeAction(U1Params(beta), lat)
    gen = make_generator(args.seed, 30, int(10 * beta), L)
    kl, kl_err = true_kl(model, theory, args.kl_samples, 256, gen)
    batch = fastest_flow_batch(model, theory, batches, gen)
    sampler = FlowMCMC(model, lambda x: -theory.action(x), batch_size=batch, generator=gen)
    sampler.run(batch)  # start (importance resampling) and burn-in
    block = batch * max(1, int(BLOCK_BYTES / (batch * 2 * lat.volume * 8)))
    qs, ps, acc, lw = [], [], [], []
    elapsed, done = 0.0, 0
    while done < n_steps and elapsed < max_seconds:
        n = min(block, n_steps - done)
        t0 = time.perf_counter()
        blk = sampler.run(n)
        elapsed += time.perf_counter() - t0
        q, p = q_and_plaquette(blk.x)
        qs.append(q)
        ps.append(p)
        acc.append(blk.accepted.numpy())
        lw.append(blk.proposal_log_w.double().numpy())
        done += n
    q, p, a = np.concatenate(qs), np.concatenate(ps), np.concatenate(acc)
    n_acc = int(a.sum())
    if n_acc >= 2:
        rq = gamma_method([q], known_mean=0.0)
        tau, dtau = rq.tau_int, rq.tau_int_err
    else:
        tau, dtau = math.inf, math.nan
    rp, rq2 = gamma_method([p]), gamma_method([q**2])
    return FlowPoint(
        label, beta, L, train_s, train_steps, kl, kl_err, batch, 1e3 * elapsed / done, float(a.mean()), n_acc,
        ess(np.concatenate(lw)), tau, dtau, done, rp.mean, rp.err, rq2.mean, rq2.err, args.amortise,
    )  # fmt: skip


def prior_model(beta: float, L: int):
    lat = Lattice((L, L))
    return make_u1_equivariant_flow(lat, 0, prior=U1PlaquettePrior(lat, beta, dtype=torch.float32), dtype=torch.float32)


def train(model, beta: float, L: int, estimator: str, seconds: float, args, tag: int) -> tuple[int, float, float]:
    """Reverse-KL training for ``seconds`` of wall time; returns steps, seconds, last true KL (nats)."""
    lat = Lattice((L, L))
    theory = U1GaugeAction(U1Params(beta), lat)
    trainer = ReverseKLTrainer(
        model,
        lambda x: -theory.action(x),
        batch_size=args.train_batch,
        lr=args.lr,
        generator=make_generator(args.seed, 20, tag, int(10 * beta)),
        grad_clip=args.grad_clip,
        estimator=estimator,
        log_z=log_z_lebesgue(beta, lat),
    )
    t0 = time.perf_counter()
    kl = float("nan")
    while time.perf_counter() - t0 < seconds:
        kl = trainer.train_step().kl
    return trainer.step, time.perf_counter() - t0, kl


def ablations(beta: float, prior_point: FlowPoint, args: argparse.Namespace) -> list[FlowPoint]:
    L = args.ablation_L
    lat = Lattice((L, L))
    out = []
    for tag, (label, prior, estimator, layers) in enumerate(
        (
            ("(a) Haar + reverse KL (reparam)", "haar", "reparam", args.haar_layers),
            ("(b) Haar + path gradients", "haar", "path", args.haar_layers),
            ("(d) plaquette prior + couplings", "plaquette", args.d_estimator, args.d_layers),
        )
    ):
        torch.manual_seed(args.seed + tag)
        pr = U1PlaquettePrior(lat, beta, dtype=torch.float32) if prior == "plaquette" else None
        model = make_u1_equivariant_flow(
            lat, layers, args.inner, hidden=tuple(args.hidden), n_mix=args.n_mix, n_bins=args.n_bins,
            zero_init=True, prior=pr, dtype=torch.float32,
        )  # fmt: skip
        steps, secs, _ = train(model, beta, L, estimator, args.train_seconds, args, tag)
        label = f"{label}, {layers} {args.inner} couplings, {steps} steps"
        out.append(flow_chain(label, model, beta, L, args.ablation_steps, [256, 1024], args, secs, steps))
        if tag == 1:
            out.append(prior_point)
    return out


# --- reporting ---------------------------------------------------------------------------------------------


def fmt_tau(t: float, dt: float) -> str:
    if not math.isfinite(t):
        return "inf"
    return f"{t:.1f}({dt:.1f})" if t < 100 else f"{t:.0f}({dt:.0f})"


def print_hmc(points: list[HMCPoint]) -> None:
    print("\n## Part 1: HMC (Omelyan, float32 links with a float64 Hamiltonian; chains started from exact samples)")
    print(
        "| beta | L | steps | acc | ms/traj/chain f32 (B) | f64 (B) | tau_int(Q) Gamma | tau_int(Q) OU | chains x traj"
        " | plaquette (z) | <Q^2> (z) | ms/indep Q f32 (Gamma; OU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for h in points:
        shape = (h.L, h.L)
        ep, eq = exact_plaquette(h.beta, shape), exact_q2(h.beta, shape)
        lb = " (lower bound: chains < 20 tau)" if h.short else ""
        src = "" if h.tau_source == "measured" else f" [{h.tau_source}]"
        print(
            f"| {h.beta:g} | {h.L} | {h.n_steps} | {h.acceptance:.3f} | {h.ms32:.4f} ({h.batch32}) |"
            f" {h.ms64:.4f} ({h.batch64}) | {fmt_tau(h.tau_q, h.tau_q_err)}{lb}{src} | {h.tau_ou:.0f} |"
            f" {h.n_chains} x {h.n_traj} | {h.plaquette:.6f}({1e6 * h.plaquette_err:.0f}e-6)"
            f" ({z_score(h.plaquette, h.plaquette_err, ep):+.1f}) | {h.q2:.3f}({h.q2_err:.3f})"
            f" ({z_score(h.q2, h.q2_err, eq):+.1f}) | {h.ms_per_indep:.3g}; {h.ms_per_indep_ou:.3g} |"
        )


def print_flow(title: str, points: list[FlowPoint], hmc: dict[tuple[float, int], HMCPoint]) -> None:
    print(f"\n## {title}")
    print(
        "| model | beta | L | train s (steps) | KL nats | batch | ms/proposal | acc | ESS/proposal | tau_int(Q) | steps"
        " | plaquette (z) | <Q^2> (z) | ms/indep Q | HMC/flow (Gamma; OU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in points:
        shape = (f.L, f.L)
        ep, eq = exact_plaquette(f.beta, shape), exact_q2(f.beta, shape)
        h = hmc.get((f.beta, f.L))
        ratio = f"{h.ms_per_indep / f.ms_per_indep:.3g}; {h.ms_per_indep_ou / f.ms_per_indep:.3g}" if h else "-"
        flag = "*" if f.n_accepted < 100 else ""
        print(
            f"| {f.label} | {f.beta:g} | {f.L} | {f.train_seconds:.0f} ({f.train_steps}) | {f.kl:.2f}({f.kl_err:.2f})"
            f" | {f.batch} | {f.ms_per_proposal:.4f} | {f.acceptance:.4f} | {f.ess:.3g} |"
            f" {fmt_tau(f.tau_q, f.tau_q_err)}{flag} | {f.n_steps} | {f.plaquette:.6f}({1e6 * f.plaquette_err:.0f}e-6)"
            f" ({z_score(f.plaquette, f.plaquette_err, ep):+.1f}) | {f.q2:.3f}({f.q2_err:.3f})"
            f" ({z_score(f.q2, f.q2_err, eq):+.1f}) | {f.ms_per_indep:.3g} | {ratio} |"
        )
    if any(f.n_accepted < 100 for f in points):
        print("`*` fewer than 100 accepted proposals: tau_int(Q) is unreliable (a lower bound; inf if none).")


def plot(hmc: list[HMCPoint], flows: list[FlowPoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {6.0: "C0", 7.0: "C3"}
    for beta in sorted({h.beta for h in hmc} | {f.beta for f in flows}):
        c = colors.get(beta, None)
        hs = sorted((h for h in hmc if h.beta == beta), key=lambda h: h.L)
        fs = sorted((f for f in flows if f.beta == beta), key=lambda f: f.L)
        if hs:
            ax.plot(
                [h.L for h in hs],
                [h.ms_per_indep for h in hs],
                "o-",
                color=c,
                label=f"HMC, beta={beta:g} (Gamma, lower bound)",
            )
            if all(math.isfinite(h.tau_ou) for h in hs):
                ls = [h.L for h in hs]
                ax.plot(
                    ls,
                    [h.ms_per_indep_ou for h in hs],
                    "o:",
                    color=c,
                    alpha=0.6,
                    label=f"HMC, beta={beta:g} (OU estimate)",
                )
        if fs:
            ax.plot([f.L for f in fs], [f.ms_per_indep for f in fs], "s--", color=c, label=f"plaquette prior, {beta:g}")
            ax2.plot([f.L for f in fs], [f.ess for f in fs], "s--", color=c, label=f"ESS, beta={beta:g}")
            ax2.plot([f.L for f in fs], [f.acceptance for f in fs], "^:", color=c, label=f"acceptance, beta={beta:g}")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xlabel("L")
    ax.set_yscale("log")
    ax.set_ylabel("ms per independent Q (one core)")
    ax.set_title("2D U(1): cost per independent Q", fontsize=9)
    ax2.set_ylabel("per proposal")
    ax2.set_ylim(0, 1)
    ax2.set_title("plaquette prior alone: ESS and acceptance", fontsize=9)
    ax.legend(fontsize=6)
    ax2.legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--betas", type=float, nargs="+", default=[6.0, 7.0])
    p.add_argument("--Ls", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs (about a minute)")
    p.add_argument("--hmc-chains", type=int, default=256, help="chains of the tau_int(Q) runs (float32)")
    p.add_argument("--hmc-seconds", type=float, default=90.0, help="wall time of the tau_int(Q) run per (beta, L)")
    p.add_argument("--hmc-batches", type=int, nargs="+", default=[64, 256, 1024], help="chains tried for timing")
    p.add_argument("--hmc-time-traj", type=int, default=50, help="trajectories per timing run (fewer at large L)")
    p.add_argument("--hmc-tune", type=int, default=40, help="trajectories per trial number of Omelyan steps")
    p.add_argument(
        "--hmc-tau-from-table", action="store_true", help="use the L = 16 tau_int(Q) of BENCHMARKS.md at every L"
    )
    p.add_argument("--flow-steps", type=int, default=100_000, help="flow-MCMC steps per (beta, L), prior alone")
    p.add_argument("--flow-max-seconds", type=float, default=math.inf, help="cap on the sampling time per chain")
    p.add_argument("--flow-batches", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--kl-samples", type=int, default=2048, help="proposals for the true KL")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--ablation-betas", type=float, nargs="+", default=[6.0, 7.0])
    p.add_argument("--ablation-L", type=int, default=16)
    p.add_argument("--ablation-steps", type=int, default=20_000, help="flow-MCMC steps per trained model")
    p.add_argument("--train-seconds", type=float, default=120.0, help="training wall time of each trained model")
    p.add_argument("--haar-layers", type=int, default=16)
    p.add_argument("--d-layers", type=int, default=8)
    p.add_argument("--d-estimator", default="path", choices=["reparam", "path", "reinforce"])
    p.add_argument("--inner", default="ncp", choices=["ncp", "spline"])
    p.add_argument("--hidden", type=int, nargs="+", default=[8, 8])
    p.add_argument("--n-mix", type=int, default=6)
    p.add_argument("--n-bins", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--grad-clip", type=float, default=100.0)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--amortise", type=float, default=1e5, help="configurations the training is amortised over")
    p.add_argument("--plot", type=Path, default=Path("benchmarks/figures/u1_plaquette_prior_cost.png"))
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=17)
    args = p.parse_args()
    if args.quick:
        args.Ls, args.hmc_chains, args.hmc_seconds, args.hmc_batches = [8, 16], 16, 2.0, [16, 64]
        args.hmc_time_traj, args.hmc_tune, args.flow_steps, args.flow_batches = 10, 10, 4000, [256, 1024]
        args.kl_samples, args.ablation_betas, args.ablation_L, args.ablation_steps = 256, [6.0], 8, 2000
        args.train_seconds, args.haar_layers, args.d_layers = 3.0, 8, 8
        args.plot = Path("u1_plaquette_prior_quick.png")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# 2D U(1) topology, plaquette prior vs HMC. {datetime.date.today()}; machine: {platform.machine()},"
        f" {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads, torch {torch.__version__},"
        f" python {platform.python_version()}"
    )
    print(f"# options: {vars(args)}")
    t_start = time.perf_counter()
    hmc_points = []
    for beta in args.betas:
        for L in args.Ls:
            h = hmc_point(beta, L, args)
            hmc_points.append(h)
            print(
                f"  HMC beta={beta:g} L={L}: {h.n_steps} steps, f32 {h.ms32:.4f} ms, tau_int(Q) {h.tau_q:.1f}"
                f" (OU {h.tau_ou:.0f}), {h.n_chains} x {h.n_traj} [{time.perf_counter() - t_start:.0f} s]",
                flush=True,
            )
    hmc = {(h.beta, h.L): h for h in hmc_points}
    print_hmc(hmc_points)
    sys.stdout.flush()

    prior_points = []
    for beta in args.betas:
        for L in args.Ls:
            f = flow_chain(
                "plaquette prior alone", prior_model(beta, L), beta, L, args.flow_steps, args.flow_batches, args,
                max_seconds=args.flow_max_seconds,
            )  # fmt: skip
            prior_points.append(f)
            print(f"  prior beta={beta:g} L={L}: done [{time.perf_counter() - t_start:.0f} s]", flush=True)
    print_flow("Part 2: flow-MCMC with the plaquette prior alone (no training)", prior_points, hmc)
    sys.stdout.flush()

    abl = []
    if not args.no_ablations:
        for beta in args.ablation_betas:
            pp = next((f for f in prior_points if f.beta == beta and f.L == args.ablation_L), None)
            if pp is None:
                pp = flow_chain(
                    "plaquette prior alone", prior_model(beta, args.ablation_L), beta, args.ablation_L,
                    args.flow_steps, args.flow_batches, args,
                )  # fmt: skip
            pp = FlowPoint(**{**asdict(pp), "label": "(c) plaquette prior alone"})
            abl += ablations(beta, pp, args)
            print(f"  ablations beta={beta:g}: done [{time.perf_counter() - t_start:.0f} s]", flush=True)
        print_flow(
            f"Part 3: ablations at L = {args.ablation_L}, {args.train_seconds:.0f} s of training each"
            f" (amortised over {args.amortise:.0e} configurations)",
            abl,
            hmc,
        )
    plot(hmc_points, prior_points, args.plot)
    print(f"\n# total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        rows = {
            "hmc": [
                {**asdict(h), "ms_per_indep": h.ms_per_indep, "ms_per_indep_ou": h.ms_per_indep_ou} for h in hmc_points
            ],
            "prior": [{**asdict(f), "ms_per_indep": f.ms_per_indep} for f in prior_points],
            "ablations": [{**asdict(f), "ms_per_indep": f.ms_per_indep} for f in abl],
        }
        args.json.write_text(json.dumps(rows, default=float, indent=1))


if __name__ == "__main__":
    main()
