"""Schwinger model (2D U(1), Nf = 2 Wilson), beta = 2: SMC annealed in kappa from the exactly sampled pure
gauge theory against pseudofermion HMC, in one process.

For each lattice L and hopping parameter kappa:

* **PF-HMC** (the fair settings of ``benchmarks/schwinger_flow_vs_hmc.py``): batched chains started from
  exact pure-gauge draws, Omelyan, trajectory length 1, even/odd preconditioning with one Hasenbusch factor
  at ``kappa' = --hasenbusch`` when ``kappa > kappa'`` (even/odd alone otherwise). Printed: ms per
  trajectory per chain, tau_int (Gamma method) of the plaquette, of ``Q`` (known ``<Q> = 0``), of ``Q^2`` and
  of the condensate ``Sigma`` (exact, dense), and the cost per independent sample ``ms x 2 tau_int``.
* **SMC in kappa**: ``kappa(t) = kappa t`` from exact pure-gauge draws (``log Z_0`` exact), HMC kernel
  (Omelyan, analytic force) on the exact effective action ``S_g - log det(D^dag D)`` with dense
  determinants, systematic resampling at ESS < 1/2, ``P`` independent runs of ``N`` particles. ``n_eff`` per
  run of an observable is ``Var(O) / Var_r(O_r)`` (``Var(O)`` from the pooled weighted sample, about the
  exact mean 0 for ``Q``); the cost per independent sample is the wall time per run / ``n_eff``.
* **direct reweighting** (the same estimator with one transition and no kernel): exact pure-gauge draws
  weighted by ``det(D^dag D)``, split into groups of ``N``; it gives the direct estimate
  ``log Z(kappa) - log Z(0) = log E_0[det(D^dag D)]`` that the SMC ``log Z`` is compared with.

The dense force costs ``O(V^3)`` per configuration (one ``2V x 2V`` complex inverse); it is timed and
printed with the counts of forces and actions per SMC run.

Usage::

    python benchmarks/schwinger_annealing.py                 # the BENCHMARKS.md run (~12 min on 2 loaded cores)
    python benchmarks/schwinger_annealing.py --quick         # a minute; checks the script runs
    python benchmarks/schwinger_annealing.py --sizes 8 --kappas 0.26 --smc-transitions 8
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from latflow.analysis import gamma_method
from latflow.lattice import Lattice
from latflow.manifolds import U1Angles
from latflow.rng import make_generator
from latflow.samplers.annealing import SMC, CouplingPath, HMCKernel, StepSize, fixed_schedule
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.theories.schwinger import SchwingerModel, SchwingerParams
from latflow.theories.u1 import exact_log_z, sample_exact_2d

BETA = 2.0
OBSERVABLES = ("plaquette", "Q", "Q^2", "Sigma")
KNOWN_MEANS = {"Q": 0.0}


@dataclass
class Row:
    """One sampler at one point: cost per step (trajectory per chain, or run) and its statistics."""

    sampler: str
    ms_per_unit: float  # ms per trajectory per chain (MCMC) or per run (weighted)
    unit: str
    acceptance: float
    factor: dict[str, float]  # 2 tau_int (MCMC) or 1 / n_eff per run (weighted): units per independent sample
    means: dict[str, tuple[float, float]]
    extra: dict[str, float] = field(default_factory=dict)
    per_run: dict[str, tuple[float, float]] = field(default_factory=dict)  # weighted runs: mean of the O_r

    def ms_per_indep(self, name: str) -> float:
        return self.ms_per_unit * self.factor[name]


def per_config_observables(theory: SchwingerModel, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Plaquette, rounded geometric ``Q``, ``Q^2`` and the exact condensate ``[B]`` each."""
    obs = theory.observables(x)
    q = obs["topological_charge"].round()
    return {
        "plaquette": obs["plaquette"].numpy(),
        "Q": q.numpy(),
        "Q^2": (q * q).numpy(),
        "Sigma": obs["chiral_condensate"].numpy(),
    }


# --- pseudofermion HMC ------------------------------------------------------------------------------


def run_pf_hmc(theory: SchwingerModel, args: argparse.Namespace, L: int, seed: int) -> Row:
    chains, n_traj = args.hmc_chains[str(L)], args.hmc_traj[str(L)]
    gen = make_generator(seed, 4)
    x0 = sample_exact_2d(BETA, (L, L), chains, gen)
    hb = (args.hasenbusch,) if theory.kappa > args.hasenbusch + 1e-9 else ()
    hmc = PseudofermionHMC.for_theory(
        theory,
        x0,
        step_size=1.0 / args.hmc_steps,
        n_steps=args.hmc_steps,
        generator=gen,
        integrator="omelyan",
        even_odd=True,
        hasenbusch_kappas=hb,
        tol=1e-10,
        step_jitter=0.1,
    )
    hmc.run(args.hmc_therm)
    t0 = time.perf_counter()
    b = hmc.run(n_traj)
    dt = (time.perf_counter() - t0) / (n_traj * chains)
    cg = float(hmc.last_run_cg_iterations.double().mean())
    obs = per_config_observables(theory, b.x)
    factor, means, taus = {}, {}, {}
    for name, v in obs.items():
        v = v.reshape(n_traj, chains)
        r = gamma_method([v[:, c] for c in range(chains)], known_mean=KNOWN_MEANS.get(name))
        factor[name] = 2 * max(r.tau_int, 0.5)
        means[name] = (r.mean, r.err)
        taus[name] = r.tau_int
    name = "PF-HMC e/o" + (f" + Hasenbusch {hb[0]}" if hb else "")
    extra = {"cg": cg, **{f"tau {k}": t for k, t in taus.items()}, "therm": float(args.hmc_therm), "chains": chains}
    return Row(name, 1e3 * dt, "traj", float(b.accepted.double().mean()), factor, means, extra)


# --- weighted estimates: SMC and direct reweighting -------------------------------------------------


def weighted_stats(log_w: torch.Tensor, log_z: torch.Tensor, obs: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
    """``n_eff`` per run, the pooled estimate of all runs, and the mean of the per-run estimates.

    Parameters
    ----------
    log_w
        Normalised log weights ``[P, N]`` of each run.
    log_z
        Each run's ``log Z`` estimate ``[P]`` (runs are pooled with weights ``Z_r``, the unbiased combination).
    obs
        Per-particle values ``[P * N]`` by name.

    Returns
    -------
    (factor, pooled, per_run)
        ``1 / n_eff = Var_r(O_r) / Var(O)`` per run by name (``Var(O)`` from the pooled weighted sample; about
        the exact mean where known), the pooled estimate with its jackknife error over runs, and the mean of
        the per-run estimates ``O_r`` with its error from their spread (a self-normalised ``O_r`` of ``N``
        particles is biased by ``O(1/N)``; the pooled estimate by ``O(1/(P N))``).
    """
    w = torch.exp(log_w).numpy()
    z = torch.exp(log_z - log_z.max()).numpy()  # [P], Z_r up to a common factor
    p = w.shape[0]
    wp = w * (z / z.sum())[:, None]  # pooled weights, summing to 1
    factor, pooled, per_run = {}, {}, {}
    for name, v in obs.items():
        v = v.reshape(w.shape)
        o_r = (w * v).sum(axis=1)  # [P]
        a_r = z * o_r  # numerators of the pooled ratio
        est = float(a_r.sum() / z.sum())
        jack = (a_r.sum() - a_r) / (z.sum() - z)
        pooled[name] = (est, float(math.sqrt((p - 1) / p * ((jack - jack.mean()) ** 2).sum())))
        known = KNOWN_MEANS.get(name)
        centre = est if known is None else known
        var_o = float((wp * (v - centre) ** 2).sum())  # single-sample variance, pooled weighted sample
        if known is None:
            var_r = float(o_r.var(ddof=1))
        else:
            var_r = float(((o_r - known) ** 2).mean())
        factor[name] = var_r / var_o  # 1 / n_eff per run
        per_run[name] = (float(o_r.mean()), math.sqrt(float(o_r.var(ddof=1)) / p))
    return factor, pooled, per_run


class Counted:
    """Counts configurations passed through a batched function (forces, actions)."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn, self.n = fn, 0

    def __call__(self, x: torch.Tensor, *a: object) -> torch.Tensor:
        self.n += int(x.shape[0])
        return self.fn(x, *a)


def kappa_path(L: int, kappa: float) -> tuple[CouplingPath, Counted, Counted, float]:
    """``kappa(t) = kappa t`` from the exact pure gauge theory; returns (path, counted action, counted force,
    ``log Z_0`` in the Lebesgue measure on the angles)."""
    lattice = Lattice((L, L))
    models: dict[float, SchwingerModel] = {}

    def model(t: float) -> SchwingerModel:
        if t not in models:
            models[t] = SchwingerModel(SchwingerParams(BETA, kappa * t), lattice)
        return models[t]

    def log_density(theta: torch.Tensor, t: float) -> torch.Tensor:
        m = model(t)
        return -(m.gauge_action(theta) if t == 0.0 else m.action(theta))

    def force(theta: torch.Tensor, t: float) -> torch.Tensor:
        return model(t).force(theta)

    log_z0 = exact_log_z(BETA, (L, L)) + 2 * L * L * math.log(2 * math.pi)
    action, counted_force = Counted(log_density), Counted(force)
    path = CouplingPath(lambda n, g: sample_exact_2d(BETA, (L, L), n, g), log_z0, action, force=counted_force)
    return path, action, counted_force, log_z0


def run_smc(theory: SchwingerModel, args: argparse.Namespace, L: int, seed: int) -> tuple[Row, torch.Tensor]:
    """SMC in kappa; returns the row and ``log Z(kappa) - log Z(0)`` per run ``[P]``."""
    path, action, force, log_z0 = kappa_path(L, theory.kappa)
    kernel = HMCKernel(
        StepSize(1.0 / args.smc_steps),
        args.smc_steps,
        args.smc_trajectories,
        integrator="omelyan",
        manifold=U1Angles(),
        step_jitter=0.1,
    )
    smc = SMC(path, kernel, fixed_schedule(args.smc_transitions, args.smc_power), resample_threshold=0.5)
    p, n = args.smc_runs, args.smc_particles
    t0 = time.perf_counter()
    res = smc.run(n, make_generator(seed, 5), n_populations=p)
    dt = (time.perf_counter() - t0) / p
    factor, means, per_run = weighted_stats(res.log_w, res.log_z, per_config_observables(theory, res.x))
    acc = float(np.nanmean(res.acceptance))
    extra = {
        "forces/particle": force.n / (p * n),
        "actions/particle": action.n / (p * n),
        "resamplings": float(res.n_resampled().double().mean()),
        "min ESS": float(torch.stack(res.ess).min()),
        "final ESS": float(res.final_ess().mean()),
    }
    name = f"SMC K={args.smc_transitions} N={n}"
    return Row(name, 1e3 * dt, "run", acc, factor, means, extra, per_run), res.log_z - log_z0


def run_direct(theory: SchwingerModel, args: argparse.Namespace, L: int, seed: int) -> tuple[Row, float, float]:
    """Exact pure-gauge draws weighted by ``det(D^dag D)``, in groups of ``N``; returns the row and
    ``log E_0[det D^dag D]`` with its error."""
    n, groups = args.smc_particles, args.direct_groups
    gen = make_generator(seed, 6)
    t0 = time.perf_counter()
    x = sample_exact_2d(BETA, (L, L), n * groups, gen)
    with torch.no_grad():
        logdet = theory.fermion_logdet(x).double()
    dt = (time.perf_counter() - t0) / groups
    log_w = logdet.view(groups, n)
    log_w = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)
    log_z = torch.logsumexp(logdet.view(groups, n), dim=1) - math.log(n)
    factor, means, per_run = weighted_stats(log_w, log_z, per_config_observables(theory, x))
    m = logdet.numel()
    log_ratio = float(torch.logsumexp(logdet, 0)) - math.log(m)
    rel = torch.exp(logdet - log_ratio)  # det / mean det
    err = float(rel.std()) / math.sqrt(m)  # error of log E_0[det] (delta method)
    ess = float(rel.sum() ** 2 / (rel**2).sum()) / m
    row = Row(f"reweighting N={n}", 1e3 * dt, "run", float("nan"), factor, means, {"ESS": ess}, per_run)
    return row, log_ratio, err


# --- report --------------------------------------------------------------------------------------------


def report(
    L: int, kappa: float, rows: list[Row], smc_dlogz: torch.Tensor, direct: tuple[float, float], n_indep: int = 1000
) -> None:
    print(f"\n## L = {L}, beta = {BETA}, kappa = {kappa}   (load average {os.getloadavg()})")
    head = " ".join(f"{'ms/ind ' + o:>14}" for o in OBSERVABLES)
    print(f"{'sampler':<30} {'acc':>6} {'ms/unit':>12} {'units/indep (P Q Q2 S)':>26} {head}")
    for r in rows:
        f = " ".join(f"{r.factor[o]:6.2f}" for o in OBSERVABLES)
        c = " ".join(f"{r.ms_per_indep(o):14.1f}" for o in OBSERVABLES)
        print(f"{r.sampler:<30} {r.acceptance:6.3f} {r.ms_per_unit:9.1f}/{r.unit:<4} {f:>26} {c}")
    p = smc_dlogz.shape[0]
    print("weighted runs: pooled estimate of all runs (Z-weighted, jackknife error over runs); below it the mean of")
    print("the per-run estimates, whose O(1/N) self-normalisation bias the pooled estimate removes")
    print(
        "units/indep: 2 tau_int for the chains, 1/n_eff per run for the weighted runs (relative error of 1/n_eff"
        f" ~ sqrt(2/(P-1)) = {math.sqrt(2 / (p - 1)):.2f} for P = {p} runs)"
    )
    for r in rows:
        ms = "  ".join(f"{o} {r.means[o][0]:.5f}({r.means[o][1]:.5f})" for o in OBSERVABLES)
        ex = ", ".join(f"{k} {v:.3g}" for k, v in r.extra.items())
        print(f"{r.sampler:<30} {ms}   [{ex}]")
        if r.per_run:
            ms = "  ".join(f"{o} {r.per_run[o][0]:.5f}({r.per_run[o][1]:.5f})" for o in OBSERVABLES)
            print(f"{'  mean of per-run estimates':<30} {ms}")
    hmc = rows[0]
    for r in rows[1:]:
        ratios = "  ".join(f"{o} {hmc.ms_per_indep(o) / r.ms_per_indep(o):.3g}" for o in OBSERVABLES)
        print(f"cost ratio {hmc.sampler} / {r.sampler}: {ratios}")
    for r in rows[1:]:
        zs = []
        for o in OBSERVABLES:
            (m1, e1), (m0, e0) = r.means[o], hmc.means[o]
            zs.append(f"{o} {(m1 - m0) / math.hypot(e1, e0):+.2f}")
        print(f"z-scores (pooled) {r.sampler} vs {hmc.sampler}: " + "  ".join(zs))
    therm_s = hmc.extra["therm"] * hmc.ms_per_unit * hmc.extra["chains"] / 1e3
    print(
        f"total for {n_indep} independent plaquettes (no training in any of them): {hmc.sampler}"
        f" {n_indep * hmc.ms_per_indep('plaquette') / 1e3 + therm_s:.1f} s (incl. {therm_s:.1f} s thermalisation), "
        + ", ".join(f"{r.sampler} {n_indep * r.ms_per_indep('plaquette') / 1e3:.1f} s" for r in rows[1:])
    )
    d, d_err = direct
    ratio = torch.exp(smc_dlogz - d)  # unbiased estimates of Z(kappa) / Z(0) / exp(direct)
    z = (float(ratio.mean()) - 1.0) / math.sqrt(float(ratio.var()) / p + d_err**2)
    lme = float(torch.logsumexp(smc_dlogz, 0)) - math.log(p)
    print(
        f"log Z(kappa) - log Z(0): SMC mean over runs {float(smc_dlogz.mean()):.4f},"
        f" spread {float(smc_dlogz.std()):.4f} per run, log-mean-exp of {p} runs {lme:.4f};"
        f"  direct log E_0[det] {d:.4f} +- {d_err:.4f};"
        f"  z (linear scale) {z:+.2f}"
    )


def time_dense(theory: SchwingerModel, batch: int, gen: torch.Generator) -> tuple[float, float]:
    """ms per configuration of the dense force and action at a batch of ``batch``."""
    L = theory.lattice.shape[0]
    x = sample_exact_2d(BETA, (L, L), batch, gen)
    theory.force(x)
    tf, ta = [], []
    for _ in range(3):  # the fastest of three: the machine is shared
        t0 = time.perf_counter()
        theory.force(x)
        tf.append(time.perf_counter() - t0)
        with torch.no_grad():
            t0 = time.perf_counter()
            theory.action(x)
            ta.append(time.perf_counter() - t0)
    return 1e3 * min(tf) / batch, 1e3 * min(ta) / batch


def volume_scan(sizes: list[int], kappas: list[float], n: int, seed: int) -> None:
    """Where the dense anneal stops being viable: cost of the dense force and action per configuration, and the
    spread of ``log det(D^dag D)`` over exact pure-gauge draws (the one-step reweighting weights; its ESS)."""
    print(f"\n# volume scan ({n} exact pure-gauge draws per point; load average {os.getloadavg()})")
    print(f"{'L':>3} {'kappa':>6} {'force ms/cfg':>13} {'action ms/cfg':>14} {'std log det':>12} {'ESS/draw':>9}")
    for L in sizes:
        for kappa in kappas:
            theory = SchwingerModel(SchwingerParams(BETA, kappa), Lattice((L, L)))
            gen = make_generator(seed, 8)
            tf, ta = time_dense(theory, min(n, 16), gen)
            x = sample_exact_2d(BETA, (L, L), n, gen)
            with torch.no_grad():
                logdet = theory.fermion_logdet(x).double()
            rel = torch.exp(logdet - logdet.max())
            ess = float(rel.sum() ** 2 / (rel**2).sum()) / n
            print(f"{L:>3} {kappa:>6} {tf:>13.2f} {ta:>14.2f} {float(logdet.std()):>12.3f} {ess:>9.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--kappas", type=float, nargs="+", default=[0.20, 0.26])
    p.add_argument("--hasenbusch", type=float, default=0.2, help="kappa' of the heavier Hasenbusch fermion")
    p.add_argument("--hmc-steps", type=int, default=5, help="Omelyan steps per unit trajectory (PF-HMC)")
    p.add_argument("--hmc-therm", type=int, default=30)
    p.add_argument("--smc-transitions", type=int, default=4, help="K, kappa(t_k) = kappa (k/K)^power")
    p.add_argument("--smc-power", type=float, default=1.0)
    p.add_argument("--smc-steps", type=int, default=5, help="Omelyan steps per unit trajectory (SMC kernel)")
    p.add_argument("--smc-trajectories", type=int, default=1, help="kernel trajectories per transition")
    p.add_argument("--smc-particles", type=int, default=16)
    p.add_argument("--smc-runs", type=int, default=16, help="P independent runs")
    p.add_argument("--direct-groups", type=int, default=256, help="groups of N draws of the direct reweighting")
    p.add_argument("--scan-sizes", type=int, nargs="*", default=[12, 16], help="volume scan of the dense costs")
    p.add_argument("--scan-draws", type=int, default=64)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    args.hmc_chains = {"4": 16, "8": 16}
    args.hmc_traj = {"4": 200, "8": 120}
    if args.quick:
        args.sizes, args.kappas = [4], [0.2]
        args.hmc_traj, args.hmc_therm, args.smc_runs, args.smc_particles = {"4": 30}, 5, 4, 8
        args.direct_groups, args.scan_sizes, args.scan_draws = 16, [6], 16
    torch.set_num_threads(args.threads)
    print("# command: python " + " ".join(sys.argv))
    print(
        f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__},"
        f" float64; load average {os.getloadavg()}"
    )
    print(
        f"# beta = {BETA}; PF-HMC: Omelyan {args.hmc_steps} steps, tau = 1, even/odd, Hasenbusch kappa' ="
        f" {args.hasenbusch} where kappa > kappa'; SMC: K = {args.smc_transitions} (power {args.smc_power}),"
        f" {args.smc_trajectories} Omelyan trajectory of {args.smc_steps} steps per transition, exact dense"
        f" force, P = {args.smc_runs} runs of N = {args.smc_particles}"
    )
    for L in args.sizes:
        for kappa in args.kappas:
            theory = SchwingerModel(SchwingerParams(BETA, kappa), Lattice((L, L)))
            tf, ta = time_dense(theory, args.smc_particles * args.smc_runs, make_generator(args.seed, 7))
            print(
                f"\n# L = {L}, kappa = {kappa}: dense force {tf:.2f} ms, dense action {ta:.2f} ms per configuration"
                f" (batch {args.smc_particles * args.smc_runs})",
                flush=True,
            )
            hmc = run_pf_hmc(theory, args, L, args.seed)
            smc, dlogz = run_smc(theory, args, L, args.seed)
            direct, d, d_err = run_direct(theory, args, L, args.seed)
            report(L, kappa, [hmc, smc, direct], dlogz, (d, d_err))
            sys.stdout.flush()
    if args.scan_sizes:
        volume_scan(sorted(set(args.sizes) | set(args.scan_sizes)), args.kappas, args.scan_draws, args.seed)


if __name__ == "__main__":
    main()
