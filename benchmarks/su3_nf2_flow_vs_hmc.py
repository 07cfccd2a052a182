"""2D SU(3) with Nf = 2 Wilson fermions: the joint pseudofermion flow against pseudofermion HMC, in one process.

Everything runs with ``--threads`` (1) torch threads, so every cost is per core. Costs per independent sample
are ``time per Markov step x 2 tau_int`` (Gamma method; ``tau_int = 1/2`` for independent samples).

For each lattice ``L`` in ``--sizes`` (4, 8) and each ``(beta, kappa)`` in ``--points`` (``4:0.2``, ``4:0.24``):

* **PF-HMC** (:class:`latflow.samplers.pf_hmc.PseudofermionHMC`): even/odd preconditioning and one Hasenbusch
  factor at ``--hasenbusch`` (0.15), Omelyan, trajectory length 1 with the fewest steps per unit trajectory
  (1 ... 8) reaching 85% acceptance on a short trial, 10% step jitter, ``--hmc-chains`` batched chains
  started from the plaquette prior at the gauge beta, ``--hmc-therm`` thermalisation trajectories, CG to
  1e-9. Seconds per trajectory per chain, CG iterations per trajectory (all solves of all factors), tau_int
  of the plaquette and of the chiral condensate (dense ``(1/V) Re Tr D^-1``; chains as replicas).
* **Joint pseudofermion flow-MCMC** (:class:`latflow.samplers.PseudofermionFlowMCMC`): links from the 2D
  SU(3) plaquette prior at the gauge beta alone (:class:`latflow.sun_plaquette_prior.SUNPlaquettePrior`,
  no training), pseudofermions from the gauge-covariant triangular conditional with the same factors as
  PF-HMC (even/odd + the Hasenbusch factor), CG to 1e-8 with a dense fallback for stalled solves. Two
  conditionals: the untrained one widened by ``DEFAULT_DISPERSION`` (the choice of the Schwinger benchmarks)
  and the same map fitted by maximum likelihood on exact pseudofermion draws at prior links
  (:func:`latflow.fermions.conditional.fit_to_heatbath`, forward KL, mass covering) for ``--fit-seconds``
  of wall time; the fit time is the training cost amortised over ``--amortise`` independent samples.
* **Exact-determinant flow-MCMC** (:func:`latflow.samplers.pf_flow_mcmc.exact_determinant_flow_mcmc`): the
  same prior with the dense ``S_eff = S_g - log det(D^dag D)`` (``V Ns N <= 600`` rows; L = 4 and 8).

Printed per sampler: acceptance, ms per Markov step per chain, CG iterations per step, tau_int of the
plaquette and of the condensate, cost per independent plaquette (ms), with the training amortised, and the
plaquette / condensate with the plaquette's z-score against PF-HMC. Independence samplers with fewer than
30 accepted proposals use the bound ``tau_int >= 1/acc - 1/2`` (marked ``*``; with none accepted, the
chain length). Ratios PF-HMC / sampler of the cost per independent plaquette follow each table.

The condensate is evaluated once per distinct configuration (rejected flow proposals repeat the state).
The spectral flow on top of the prior is not used here: in 2D the gauge part of the prior is nearly exact
(pure-gauge benchmark ``benchmarks/su3_flow_vs_hmc.py``); what limits the joint flow is the pseudofermion
weight, which this benchmark isolates.

Usage::

    python benchmarks/su3_nf2_flow_vs_hmc.py                     # the default run (~12 min on one core)
    python benchmarks/su3_nf2_flow_vs_hmc.py --quick             # seconds; checks the script runs
    python benchmarks/su3_nf2_flow_vs_hmc.py --sizes 8 --points 4:0.24 --json nf2.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from latflow.analysis import gamma_method
from latflow.fermions.conditional import DEFAULT_DISPERSION, TriangularConditional, fit_to_heatbath
from latflow.fermions.solvers import ConvergenceError
from latflow.flows.model import FlowModel
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import PseudofermionFlowMCMC
from latflow.samplers.pf_flow_mcmc import exact_determinant_flow_mcmc
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.sun_plaquette_prior import SUNPlaquettePrior
from latflow.theories.su3_nf2 import SUNNf2Model, SUNNf2Params

N_COLORS = 3
TARGET_ACCEPTANCE = 0.85
MIN_ACCEPTED = 30  # fewer accepted proposals than this: tau_int of an independence sampler from its bound


@dataclass
class Row:
    """One sampler at one ``(L, beta, kappa)``; times in ms per Markov step per chain."""

    sampler: str
    acceptance: float
    ms_per_step: float
    cg_per_step: float
    tau_plaq: float
    tau_cond: float
    bounded: bool
    plaquette: tuple[float, float]
    condensate: tuple[float, float]
    train_s: float = 0.0
    n_steps: int = 0

    @property
    def ms_per_indep(self) -> float:
        return self.ms_per_step * 2 * max(self.tau_plaq, 0.5)

    def ms_per_indep_with_training(self, n_indep: int) -> float:
        return self.ms_per_indep + 1e3 * self.train_s / n_indep


def z_score(a: tuple[float, float], b: tuple[float, float]) -> float:
    s = math.hypot(a[1], b[1])
    return (a[0] - b[0]) / s if s > 0 else float("nan")


def observables(theory: SUNNf2Model, x: torch.Tensor, new: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Plaquette and condensate ``[n]`` of rows ``x`` ``[n, 2, L, L, 3, 3]``.

    Rows with ``new[i]`` false repeat row ``i - 1`` and are not recomputed (``new[0]`` must be true).
    """
    idx = torch.cumsum(new.long(), 0) - 1
    obs = theory.observables(x[new])
    return obs["plaquette"][idx].double().numpy(), obs["chiral_condensate"][idx].double().numpy()


def analyse(
    name: str, theory: SUNNf2Model, x: torch.Tensor, acc: torch.Tensor, dt: float, cg: float, n_chains: int
) -> Row:
    """Gamma-method analysis of rows ``x`` (step-major, ``n_chains`` chains) with accept flags ``acc``."""
    if n_chains == 1:
        new = acc.clone()
        new[0] = True
    else:
        new = torch.ones_like(acc)
    plaq, cond = observables(theory, x, new)
    plaq, cond = plaq.reshape(-1, n_chains), cond.reshape(-1, n_chains)
    rp = gamma_method([plaq[:, c] for c in range(n_chains)])
    rc = gamma_method([cond[:, c] for c in range(n_chains)])
    a = float(acc.double().mean())
    tp, tc, bounded = rp.tau_int, rc.tau_int, False
    if n_chains == 1 and a * plaq.size < MIN_ACCEPTED:
        tp = tc = 1 / max(a, 1 / plaq.size) - 0.5
        bounded = True
    return Row(name, a, 1e3 * dt, cg, tp, tc, bounded, (rp.mean, rp.err), (rc.mean, rc.err))


def run_pf_hmc(theory: SUNNf2Model, L: int, args: argparse.Namespace) -> Row:
    """PF-HMC (even/odd + Hasenbusch, Omelyan), step count tuned to the target acceptance."""
    chains = args.hmc_chains[str(L)]
    gen = make_generator(args.seed, 4)
    x, _ = SUNPlaquettePrior(theory.lattice, theory.beta, N_COLORS).sample(chains, gen)

    def build(x0: torch.Tensor, n_steps: int) -> PseudofermionHMC:
        return PseudofermionHMC.for_theory(
            theory,
            x0,
            step_size=1.0 / n_steps,
            n_steps=n_steps,
            generator=gen,
            even_odd=True,
            hasenbusch_kappas=(args.hasenbusch,),
            tol=1e-9,
            step_jitter=0.1,
        )

    trial = []
    for n_steps in args.hmc_step_counts:
        hmc = build(x, n_steps)
        hmc.run(2)
        acc = float(hmc.run(args.hmc_trial).accepted.double().mean())
        trial.append(f"{n_steps}: {acc:.2f}")
        x = hmc.x
        if acc >= TARGET_ACCEPTANCE:
            break
    hmc = build(x, n_steps)
    hmc.run(args.hmc_therm)
    n_traj = args.hmc_traj[str(L)]
    t0 = time.perf_counter()
    b = hmc.run(n_traj)
    dt = (time.perf_counter() - t0) / (n_traj * chains)
    cg = float(hmc.last_run_cg_iterations.double().mean())
    print(
        f"# PF-HMC: {chains} chains, Omelyan steps per unit trajectory tried (acceptance) {', '.join(trial)};"
        f" {args.hmc_therm} + {n_traj} trajectories",
        flush=True,
    )
    row = analyse(f"PF-HMC e/o+HB, {n_steps} Omelyan", theory, b.x, b.accepted, dt, cg, chains)
    row.n_steps = n_traj * chains
    return row


def run_flow(
    name: str, theory: SUNNf2Model, model: FlowModel, n: int, args: argparse.Namespace, conditional=None
) -> Row:
    """Flow-MCMC from ``model``: joint pseudofermion chain with ``conditional``, or exact determinant (None)."""
    batch = min(args.flow_batch, n)
    if conditional is not None:
        sampler = PseudofermionFlowMCMC.for_theory(
            theory,
            model,
            batch_size=batch,
            generator=make_generator(args.seed, 3),
            conditional=conditional,
            tol=1e-8,
            dense_fallback=True,
        )
    else:
        batch = min(batch, 25)  # dense determinants: memory
        sampler = exact_determinant_flow_mcmc(model, theory, batch_size=batch, generator=make_generator(args.seed, 2))
    sampler.run(batch)  # start from an accepted proposal of a first batch
    t0 = time.perf_counter()
    b = sampler.run(n)
    dt = (time.perf_counter() - t0) / n
    cg = float(sampler.last_run_cg_iterations.double().sum(dim=1).mean()) if conditional is not None else 0.0
    row = analyse(name, theory, b.x, b.accepted, dt, cg, 1)
    row.n_steps = n
    return row


def fitted_conditional(theory: SUNNf2Model, prior: SUNPlaquettePrior, args: argparse.Namespace):
    """The triangular conditional fitted to exact pseudofermion draws at prior links for ``--fit-seconds``."""
    cond = TriangularConditional(theory.dirac, even_odd=True, hasenbusch_kappas=(args.hasenbusch,))
    gen = make_generator(args.seed, 6)

    def links(b: int, g: torch.Generator) -> torch.Tensor:
        return prior.sample(b, g)[0]

    t0, losses = time.perf_counter(), []
    while time.perf_counter() - t0 < args.fit_seconds:
        losses += fit_to_heatbath(cond, links, steps=5, batch_size=args.fit_batch, lr=args.fit_lr, generator=gen)
    cond.requires_grad_(False)
    return cond, time.perf_counter() - t0, len(losses)


def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    hmc = rows[0]
    print(
        f"{'sampler':<34} {'acc':>6} {'ms/step':>8} {'CG/step':>7} {'tau plaq':>9} {'tau cond':>9}"
        f" {'ms/indep':>9} {'+train':>9} {'train s':>7}  {'plaquette':<15} {'z(HMC)':>6}  condensate"
    )
    for r in rows:
        star = "*" if r.bounded else " "
        z = "" if r is hmc else f"{z_score(r.plaquette, hmc.plaquette):+6.2f}"
        print(
            f"{r.sampler:<34} {r.acceptance:>6.3f} {r.ms_per_step:>8.2f} {r.cg_per_step:>7.0f}"
            f" {r.tau_plaq:>8.1f}{star} {r.tau_cond:>8.1f}{star} {r.ms_per_indep:>9.1f}"
            f" {r.ms_per_indep_with_training(args.amortise):>9.1f} {r.train_s:>7.0f}"
            f"  {r.plaquette[0]:.5f}({1e5 * r.plaquette[1]:3.0f}) {z:>6}"
            f"  {r.condensate[0]:.5f}({1e5 * r.condensate[1]:.0f})"
        )
    for r in rows[1:]:
        with_training = hmc.ms_per_indep / r.ms_per_indep_with_training(args.amortise)
        print(
            f"ratio PF-HMC / {r.sampler}: cost per independent plaquette {hmc.ms_per_indep / r.ms_per_indep:.3g},"
            f" with training ({args.amortise} indep.) {with_training:.3g},"
            f" time per step {hmc.ms_per_step / r.ms_per_step:.3g}"
        )


def benchmark_point(beta: float, kappa: float, L: int, args: argparse.Namespace) -> list[Row]:
    theory = SUNNf2Model(SUNNf2Params(beta, kappa, N_COLORS), Lattice((L, L)))
    print(f"\n## L = {L}, beta = {beta}, kappa = {kappa} (dense dimension {theory.dense_dim})", flush=True)
    rows = [run_pf_hmc(theory, L, args)]
    prior = SUNPlaquettePrior(theory.lattice, beta, N_COLORS)
    model = FlowModel(prior, [])
    n = args.flow_samples[str(L)]
    default = TriangularConditional(
        theory.dirac, even_odd=True, hasenbusch_kappas=(args.hasenbusch,), dispersion=DEFAULT_DISPERSION
    )
    fitted, t_fit, fit_steps = fitted_conditional(theory, prior, args)
    print(f"# conditional fitted {fit_steps} steps (batch {args.fit_batch}) in {t_fit:.0f} s", flush=True)
    jobs = [
        (f"pf-flow prior, cond x{DEFAULT_DISPERSION}", default, n, 0.0),
        ("pf-flow prior, cond fitted", fitted, n, t_fit),
    ]
    if theory.dense_observables:
        jobs.append(("exact-det flow, prior", None, args.exact_samples[str(L)], 0.0))
    for name, cond, n_prop, train_s in jobs:
        try:
            row = run_flow(name, theory, model, n_prop, args, cond)
        except ConvergenceError as exc:
            print(f"# {name}: {exc}", flush=True)
            continue
        row.train_s = train_s
        rows.append(row)
    print_table(rows, args)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[4, 8])
    p.add_argument("--points", nargs="+", default=["4:0.2", "4:0.24"], help="beta:kappa pairs")
    p.add_argument("--hasenbusch", type=float, default=0.15, help="kappa of the heavier Hasenbusch fermion")
    p.add_argument("--hmc-step-counts", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 8])
    p.add_argument("--hmc-trial", type=int, default=6, help="trajectories per trial step count")
    p.add_argument("--hmc-therm", type=int, default=20)
    p.add_argument("--flow-batch", type=int, default=100)
    p.add_argument("--fit-seconds", type=float, default=20.0)
    p.add_argument("--fit-batch", type=int, default=16)
    p.add_argument("--fit-lr", type=float, default=2e-2)
    p.add_argument("--amortise", type=int, default=1000, help="independent samples the training is amortised over")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args()
    args.hmc_chains = {"4": 16, "8": 8}
    args.hmc_traj = {"4": 60, "8": 40}
    args.flow_samples = {"4": 3000, "8": 2000}
    args.exact_samples = {"4": 1000, "8": 300}
    if args.quick:
        args.sizes, args.points, args.fit_seconds = [4], ["4:0.2"], 2.0
        args.hmc_chains, args.hmc_traj, args.hmc_therm, args.hmc_trial = {"4": 4}, {"4": 10}, 2, 2
        args.flow_samples, args.exact_samples = {"4": 200}, {"4": 100}
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(
        f"# machine: {platform.machine()} ({platform.processor() or 'cpu'}), {torch.get_num_threads()} torch"
        f" thread(s), torch {torch.__version__}, complex128 links,"
        f" {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )
    print(
        f"# 2D SU({N_COLORS}), Nf = 2 Wilson; even/odd + Hasenbusch kappa' = {args.hasenbusch} for PF-HMC and the"
        f" joint flow; flow links from the plaquette prior at the gauge beta (no training)"
    )
    out = []
    for point in args.points:
        beta, kappa = (float(v) for v in point.split(":"))
        for L in args.sizes:
            rows = benchmark_point(beta, kappa, L, args)
            out += [{"L": L, "beta": beta, "kappa": kappa, **asdict(r), "ms_per_indep": r.ms_per_indep} for r in rows]
    print(f"\n# total wall time {time.perf_counter() - t_start:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
