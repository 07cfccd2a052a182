"""Yukawa theory (scalar + two massless staggered fermions, 2D): flow-MCMC against pseudofermion HMC, in one process.

At each of the paper's points (:data:`latflow.theories.yukawa.PAPER_POINTS`, ``m_f = 0``) and each lattice L:

* **PF-HMC** (the baseline): :meth:`PseudofermionHMC.for_theory` (one staggered pseudofermion for
  ``det(D^dag D)``, CG), batched chains, Omelyan, trajectory length 1. A short scan over the number of steps
  per unit trajectory measures acceptance and cost; the cheapest setting with acceptance >= ``--target-acc``
  (0.8) is run for production: the fewest steps (force evaluations) that reach it; at fixed trajectory length
  tau_int in trajectories hardly depends on the step size once acceptance is high, so this is the cheapest per
  independent sample to the scan's resolution (a step at which the MD runs away and CG fails is skipped);
* **flow, exact det**: the affine (real NVP) flow of :func:`latflow.flows.make_affine_flow` (as the job
  runner builds it), trained by reverse KL on the exact effective action ``S_B - log det(D^dag D)`` (dense),
  then :class:`FlowMCMC` on that same target. The convolutional couplings do not depend on L: the flow is
  trained on the smallest L first and its weights carried to the next L, where training continues;
  the training time shown for a lattice is the cumulative time (all sizes up to it);
* **flow, pseudofermions**: the same trained flow in :meth:`PseudofermionFlowMCMC.for_theory` (joint
  (phi, pseudofermion) independence Metropolis, CG, no determinant); skipped with a "not run" line when the
  sampler cannot be built for this theory.

tau_int of ``abs_magnetization`` and ``condensate_sign`` from the Gamma method (chains as replicas);

    cost per independent sample = (wall time per Markov step per chain) x 2 tau_int,

and for the flows also with the training time amortised over ``--amortise`` (1e5) independent samples:
``cost + t_train / amortise``. Independence samplers too short to estimate tau_int (fewer than 30 accepted
proposals) use the bound ``tau_int >= 1/acc - 1/2`` (marked ``*``). Observables are measured after the
timed runs (not part of the cost). The anchor compares PF-HMC's ``<|M|>`` at ``(-4, 6, 0.1)``, L = 16,
with the third-party PF-HMC value 0.07326(17) (docs/REFERENCES.md).

Usage::

    python benchmarks/yukawa_flow_vs_hmc.py                   # the BENCHMARKS.md run (~15-20 min on 2 cores)
    python benchmarks/yukawa_flow_vs_hmc.py --quick           # a minute; checks the script runs
    python benchmarks/yukawa_flow_vs_hmc.py --production      # longer training and chains (about an hour)
    python benchmarks/yukawa_flow_vs_hmc.py --hmc-only --points g0.1 --sizes 16 --hmc-scale 4   # the anchor alone
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from latflow.analysis import ess, gamma_method
from latflow.fermions.solvers import ConvergenceError
from latflow.flows import make_affine_flow
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import FlowMCMC
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.theories.yukawa import PAPER_POINTS, YukawaParams, YukawaTheory
from latflow.training import ReverseKLTrainer

OBSERVABLES = ("abs_magnetization", "condensate_sign")
SHORT = {"abs_magnetization": "|M|", "condensate_sign": "Sigma sgn M"}
ANCHOR_POINT, ANCHOR_L, ANCHOR_VALUE = "g0.1", 16, (0.07326, 0.00017)  # third-party PF-HMC <|M|>


@dataclass
class Row:
    """One sampler's line: cost per Markov step per chain, tau_int and means per observable."""

    sampler: str
    acceptance: float
    ms_per_step: float
    tau: dict[str, tuple[float, float]]
    mean: dict[str, tuple[float, float]]
    bounded: bool = False
    ms_train: float = 0.0  # training time, ms (flows)
    notes: list[str] = field(default_factory=list)

    def ms_per_indep(self, name: str) -> float:
        return self.ms_per_step * 2 * max(self.tau[name][0], 0.5)


def theory_at(point: str, L: int) -> YukawaTheory:
    m2, lam, g = PAPER_POINTS[point]
    return YukawaTheory(YukawaParams(m2, lam, g, 0.0), Lattice((L, L)))


def analyse(
    name: str, theory: YukawaTheory, x: torch.Tensor, acc: float, ms: float, n_chains: int, **kw: object
) -> Row:
    """Gamma-method tau_int and means of ``OBSERVABLES`` for rows ``x`` ``[n * n_chains, L, L]`` (step-major)."""
    obs = theory.observables(x)
    tau, mean = {}, {}
    bounded = False
    for k in OBSERVABLES:
        a = obs[k].numpy().reshape(-1, n_chains)
        r = gamma_method([a[:, c] for c in range(n_chains)])
        tau[k], mean[k] = (r.tau_int, r.tau_int_err), (r.mean, r.err)
    if n_chains == 1 and acc * x.shape[0] < 30:  # too few accepted proposals to estimate tau_int
        bound = 1 / max(acc, 1 / x.shape[0]) - 0.5
        tau = {k: (bound, math.nan) for k in OBSERVABLES}
        bounded = True
    return Row(name, acc, ms, tau, mean, bounded, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ PF-HMC
def run_pf_hmc(theory: YukawaTheory, args: argparse.Namespace, L: int) -> tuple[Row, list[str]]:
    """Step-count scan at trajectory length 1, then production with the cheapest setting at acceptance >= target."""
    chains = args.hmc_chains[L]
    gen = make_generator(args.seed, 10 + L)
    x0 = 0.5 * torch.randn((chains, L, L), generator=gen, dtype=torch.float64)
    hmc = PseudofermionHMC.for_theory(
        theory,
        x0,
        step_size=1.0 / args.hmc_scan[0],
        n_steps=args.hmc_scan[0],
        generator=gen,
        tol=args.tol,
        step_jitter=0.1,
    )
    hmc.run(args.hmc_therm[L])  # thermalise at the finest step of the scan
    lines, chosen = [], None
    for n_steps in args.hmc_scan:
        hmc.step_size, hmc.n_steps = 1.0 / n_steps, n_steps
        t0 = time.perf_counter()
        try:
            b = hmc.run(args.hmc_scan_traj[L])
        except ConvergenceError as exc:  # MD unstable at this step: the field runs away and CG fails
            lines.append(f"  {n_steps:>2} x {1 / n_steps:.3f}: failed ({str(exc).splitlines()[0][:90]})")
            continue  # the chains' state is that before the failed trajectory
        ms = 1e3 * (time.perf_counter() - t0) / (args.hmc_scan_traj[L] * chains)
        acc = b.accepted.double().mean().item()
        cg = hmc.last_run_cg_iterations.double().mean().item()
        lines.append(
            f"  {n_steps:>2} x {1 / n_steps:.3f}: acceptance {acc:.3f}, {ms:.2f} ms/traj/chain, CG its {cg:.0f}"
        )
        if acc >= args.target_acc and (chosen is None or n_steps < chosen):
            chosen = n_steps  # fewest force evaluations (the scan's timings are too noisy on a shared machine)
    n_steps = chosen if chosen is not None else args.hmc_scan[0]
    hmc.step_size, hmc.n_steps = 1.0 / n_steps, n_steps
    n_traj = args.hmc_traj[L]
    xs, accs, cgs, failed = [], [], [], 0
    t0 = time.perf_counter()
    while len(xs) < n_traj:
        try:
            b = hmc.run(1)
        except ConvergenceError:  # not expected at the chosen step; counted and shown if it happens
            failed += 1
            if failed > n_traj // 10:
                raise
            continue
        xs.append(b.x)
        accs.append(b.accepted)
        cgs.append(hmc.last_run_cg_iterations.double().mean().item())
    ms = 1e3 * (time.perf_counter() - t0) / (n_traj * chains)
    notes = [f"B={chains} x {n_traj} traj, Omelyan {n_steps} x {1 / n_steps:.3f}, CG its/traj {np.mean(cgs):.0f}"]
    if failed:
        notes.append(f"{failed} trajectories failed in CG and were dropped")
    row = analyse("PF-HMC", theory, torch.cat(xs), torch.cat(accs).double().mean().item(), ms, chains, notes=notes)
    return row, lines


# ------------------------------------------------------------------------------------ flows
def build_flow(L: int, args: argparse.Namespace) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return make_affine_flow(Lattice((L, L)), args.layers, args.hidden, args.kernel_size, dtype=torch.float64)


def transfer(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the couplings' weights of a flow trained on another L (masks belong to the lattice)."""
    own = model.state_dict()
    model.load_state_dict({k: (own[k] if k.endswith("mask") else v) for k, v in state.items()})


def train_flow(
    theory: YukawaTheory, model: torch.nn.Module, args: argparse.Namespace, seconds: float
) -> tuple[float, int, float]:
    """Reverse KL on the exact ``S_eff`` for ``seconds``; returns (seconds, steps, ESS of the last 50 batches)."""
    trainer = ReverseKLTrainer(
        model,
        lambda x: -theory.action(x),
        batch_size=args.train_batch,
        lr=args.lr,
        generator=make_generator(args.seed, 20 + theory.lattice.shape[0]),
        grad_clip=100.0,
    )
    t0, hist = time.perf_counter(), []
    while time.perf_counter() - t0 < seconds and trainer.step < args.train_steps:
        hist.append(trainer.train_step().ess)
    return time.perf_counter() - t0, trainer.step, float(np.mean(hist[-50:])) if hist else math.nan


def run_flow_exact(theory: YukawaTheory, model: torch.nn.Module, args: argparse.Namespace, L: int) -> Row:
    s = FlowMCMC(
        model, lambda x: -theory.action(x), batch_size=args.flow_batch, generator=make_generator(args.seed, 30)
    )
    s.run(args.flow_batch)  # warm-up: the first proposal is accepted
    n = args.flow_samples[L]
    t0 = time.perf_counter()
    b = s.run(n)
    ms = 1e3 * (time.perf_counter() - t0) / n
    w_ess = ess(b.proposal_log_w.numpy())  # ESS of the proposals (independent draws from q)
    return analyse(
        "flow, exact det", theory, b.x, b.accepted.double().mean().item(), ms, 1, notes=[f"ESS/sample {w_ess:.3f}"]
    )


def run_flow_pf(theory: YukawaTheory, model: torch.nn.Module, args: argparse.Namespace, L: int) -> Row | str:
    """Pseudofermion flow-MCMC with the same flow; a "not run" reason when it cannot be built or run here."""
    try:
        from latflow.samplers import PseudofermionFlowMCMC

        s = PseudofermionFlowMCMC.for_theory(
            theory, model, batch_size=args.flow_batch, generator=make_generator(args.seed, 40), tol=args.tol
        )
        s.run(args.flow_batch)
        n = args.flow_samples[L]
        t0 = time.perf_counter()
        b = s.run(n)
        ms = 1e3 * (time.perf_counter() - t0) / n
    except Exception as exc:  # noqa: BLE001 - the sampler is being generalised to this theory; report, go on
        return f"not run: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    w_ess = ess(b.proposal_log_w.numpy())
    cg = float(s.last_run_cg_iterations.double().sum(dim=1).mean())
    return analyse(
        "flow, pseudofermions",
        theory,
        b.x,
        b.accepted.double().mean().item(),
        ms,
        1,
        notes=[f"ESS/sample {w_ess:.3f} (joint weights)", f"CG its/proposal {cg:.0f}"],
    )


# ------------------------------------------------------------------------------------ output
def print_table(rows: list[Row], args: argparse.Namespace) -> None:
    head = f"{'sampler':<21} {'acc':>6} {'ms/step':>8}"
    for k in OBSERVABLES:
        s = SHORT[k]
        head += f" {'tau ' + s:>15} {'ms/indep ' + s:>18}"
    head += f" {'+train/' + format(args.amortise, '.0e'):>14}  means: " + ", ".join(SHORT[k] for k in OBSERVABLES)
    print(head)
    for r in rows:
        line = f"{r.sampler:<21} {r.acceptance:>6.3f} {r.ms_per_step:>8.3f}"
        for k in OBSERVABLES:
            t, te = r.tau[k]
            ts = f"{t:.2f}*" if r.bounded else f"{t:.2f}({te:.2f})"
            line += f" {ts:>15} {r.ms_per_indep(k):>18.2f}"
        amort = max(r.ms_per_indep(k) for k in OBSERVABLES) + r.ms_train / args.amortise
        line += f" {amort:>14.2f}  " + ", ".join(f"{r.mean[k][0]:.5f}({r.mean[k][1]:.5f})" for k in OBSERVABLES)
        print(line + ("  [" + "; ".join(r.notes) + "]" if r.notes else ""))
    hmc = rows[0]
    for r in rows[1:]:
        for k in OBSERVABLES:
            ratio = hmc.ms_per_indep(k) / r.ms_per_indep(k)
            ratio_t = hmc.ms_per_indep(k) / (r.ms_per_indep(k) + r.ms_train / args.amortise)
            gain = hmc.ms_per_indep(k) - r.ms_per_indep(k)
            be = f"{r.ms_train / gain:.3g}" if gain > 0 else "never"
            print(
                f"  PF-HMC / {r.sampler}, {SHORT[k]}: {ratio:.3g} (training excluded), {ratio_t:.3g} (training over "
                f"{args.amortise:.0e} samples); training pays off after {be} independent samples"
            )


def print_anchor(point: str, L: int, rows: list[Row]) -> None:
    """z of each sampler's ``<|M|>`` against the third-party PF-HMC value at the anchor point and L."""
    if point != ANCHOR_POINT or L != ANCHOR_L:
        return
    ref, ref_err = ANCHOR_VALUE
    for r in rows:
        mu, err = r.mean["abs_magnetization"]
        z = (mu - ref) / math.hypot(err, ref_err)
        print(f"anchor: {r.sampler} <|M|> = {mu:.5f}({err:.5f}) against {ref}({ref_err}): z = {z:+.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", nargs="+", default=list(PAPER_POINTS), choices=list(PAPER_POINTS))
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    p.add_argument("--production", action="store_true", help="4x training and chains (about an hour)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, nargs="+", default=[16, 16])
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=100_000)
    p.add_argument("--train-seconds", type=float, nargs="+", default=[120.0, 60.0], help="per size, in order")
    p.add_argument("--flow-batch", type=int, default=500)
    p.add_argument("--hmc-scan", type=int, nargs="+", default=[8, 6, 5, 4], help="Omelyan steps per unit trajectory")
    p.add_argument("--target-acc", type=float, default=0.8)
    p.add_argument("--tol", type=float, default=1e-10, help="CG relative residual")
    p.add_argument("--amortise", type=float, default=1e5, help="independent samples the training is spread over")
    p.add_argument("--hmc-only", action="store_true", help="PF-HMC only (no flows), e.g. a longer anchor run")
    p.add_argument("--hmc-scale", type=float, default=1.0, help="multiplies the measured PF-HMC trajectories")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    args.flow_samples = {8: 20000, 16: 4000}
    args.hmc_chains = {8: 32, 16: 16}
    args.hmc_therm = {8: 40, 16: 30}
    args.hmc_scan_traj = {8: 10, 16: 6}
    args.hmc_traj = {8: 200, 16: 130}
    if args.production:
        args.train_seconds = [4 * t for t in args.train_seconds]
        args.flow_samples = {k: 4 * v for k, v in args.flow_samples.items()}
        args.hmc_traj = {k: 4 * v for k, v in args.hmc_traj.items()}
    args.hmc_traj = {k: round(args.hmc_scale * v) for k, v in args.hmc_traj.items()}
    if args.quick:
        args.points, args.sizes, args.train_seconds = ["g0.1"], [4, 8], [5.0, 5.0]
        args.flow_samples = {4: 1000, 8: 500}
        args.hmc_chains, args.hmc_therm, args.hmc_scan_traj, args.hmc_traj = (
            {4: 8, 8: 8},
            {4: 5, 8: 5},
            {4: 3, 8: 3},
            {4: 30, 8: 20},
        )
    torch.set_num_threads(args.threads)
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, float64; load average {os.getloadavg()}"
    )
    print(
        f"# flow: {args.layers} affine layers, hidden {args.hidden}, kernel {args.kernel_size}; reverse KL, batch "
        f"{args.train_batch}, lr {args.lr}; training seconds per size {args.train_seconds} (weights carried up in L)"
    )
    t_start = time.perf_counter()
    for point in args.points:
        m2, lam, g = PAPER_POINTS[point]
        state, t_train_total, steps_total = None, 0.0, 0
        for i, L in enumerate(args.sizes):
            theory = theory_at(point, L)
            if args.hmc_only:
                hmc, scan = run_pf_hmc(theory, args, L)
                print(f"\n## (m2, lam, g) = ({m2}, {lam}, {g}), m_f = 0, L = {L}; load average {os.getloadavg()}")
                print("PF-HMC scan (trajectory length 1):\n" + "\n".join(scan))
                print_table([hmc], args)
                print_anchor(point, L, [hmc])
                continue
            model = build_flow(L, args)
            if state is not None:
                transfer(model, state)
            secs = args.train_seconds[min(i, len(args.train_seconds) - 1)]
            t_train, steps, train_ess = train_flow(theory, model, args, secs)
            t_train_total += t_train
            steps_total += steps
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            hmc, scan = run_pf_hmc(theory, args, L)
            flow = run_flow_exact(theory, model, args, L)
            flow.ms_train = 1e3 * t_train_total
            pf = run_flow_pf(theory, model, args, L)
            if isinstance(pf, Row):
                pf.ms_train = 1e3 * t_train_total
            rows = [hmc, flow] + ([pf] if isinstance(pf, Row) else [])
            print(f"\n## (m2, lam, g) = ({m2}, {lam}, {g}), m_f = 0, L = {L}; load average {os.getloadavg()}")
            print(
                f"flow trained {steps} steps in {t_train:.0f} s at this L (cumulative {steps_total} steps, "
                f"{t_train_total:.0f} s); training-batch ESS (last 50 steps) {train_ess:.3f}"
            )
            print("PF-HMC scan (trajectory length 1):")
            print("\n".join(scan))
            print_table(rows, args)
            if not isinstance(pf, Row):
                print(f"flow, pseudofermions: {pf}")
            print_anchor(point, L, rows)
    print(f"\n# total wall time {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
