"""Schwinger model (2D U(1), Nf = 2 Wilson): flow samplers on the plaquette prior against pseudofermion HMC.

Proposals: the plaquette prior :class:`latflow.plaquette_prior.U1PlaquettePrior` at the gauge beta (independent
von Mises plaquettes: exact for the pure-gauge part up to one plaquette, no training), alone and followed by
gauge-equivariant NCP couplings trained briefly by reverse KL on the *full* target ``S_g - log det(D^dag D)``
(``train.target = "full"``: the exact dense determinant up to V = 100, above it the stochastic gradient of
:mod:`latflow.fermions.stochastic_logdet`, one Z2 vector per configuration).

Samplers, each on the same theory in this process:

* flow-MCMC with the **exact determinant** (dense ``logdet`` per proposal);
* **pseudofermion flow-MCMC** (joint links/pseudofermion chain, even/odd + one Hasenbusch factor, the
  triangular conditional, CG to 1e-8 with a dense fallback for stalled solves);
* **PF-HMC** (even/odd + Hasenbusch, Omelyan, trajectory length 1, batched chains): the best PF-HMC variant of
  ``benchmarks/schwinger_flow_vs_hmc.py``.

Printed per sampler: acceptance, ESS per proposal of the independence sampler (``(sum w)^2 / (N sum w^2)``
over its proposals; joint weights for the pseudofermion chain), ms per Markov step per chain, tau_int of the
plaquette and of Q, ms per independent plaquette / Q (time x 2 tau_int; for Q of the independence samplers
tau_int is taken as at least 1/acc - 1/2, since short chains underestimate it), the number of changes of Q along the
chains (``dQ``: with none, tau_int(Q) is not measured and shows 0.5), and for flows the cost per
independent Q including the training time amortised over 1000 independent samples. Independence samplers
with too few accepted proposals use the bound tau_int >= 1/acc - 1/2 (marked ``*``).

Part (a): beta = 2, kappa = 0.276 (the seed paper's point), L = 8 and 16. Part (b): L = 16 at larger beta and
kappa below the (quenched) critical value, where PF-HMC's topology freezes; the critical kappa is estimated
from the rightmost eigenvalue of the hopping matrix H on pure-gauge configurations (``D = 1 - kappa H``
first reaches zero real part at ``kappa = 1 / max Re lambda``).

Usage::

    python benchmarks/schwinger_plaquette_prior.py            # the BENCHMARKS.md run (~30 min on 2 busy cores)
    python benchmarks/schwinger_plaquette_prior.py --quick    # a minute; checks the script runs
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch
from schwinger_flow_vs_hmc import Row, analyse

from latflow.fermions.dense import dense_matrix
from latflow.fermions.solvers import ConvergenceError
from latflow.fermions.training_target import training_action
from latflow.fermions.wilson import u1_links
from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.flows.model import FlowModel
from latflow.lattice import Lattice
from latflow.plaquette_prior import U1PlaquettePrior
from latflow.rng import make_generator
from latflow.samplers import FlowMCMC, PseudofermionFlowMCMC
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.theories.schwinger import SchwingerModel, SchwingerParams
from latflow.training import ReverseKLTrainer


@dataclass
class Result:
    row: Row
    ess: float | None
    train_s: float
    q_changes: int

    def tau_q_used(self) -> float:
        """tau_int(Q); for an independence sampler (``ess`` set) at least the bound ``1/acc - 1/2``."""
        tau = max(self.row.tau_q, 0.5)
        if self.ess is not None:
            tau = max(tau, 1 / max(self.row.acceptance, 1e-12) - 0.5)
        return tau

    def ms_per_indep_q(self) -> float:
        return self.row.ms_per_step * 2 * self.tau_q_used()

    def ms_per_indep_q_with_training(self, n_indep: int = 1000) -> float:
        return self.ms_per_indep_q() + 1e3 * self.train_s / n_indep


def q_changes(theory: SchwingerModel, x: torch.Tensor, chains: int) -> int:
    """How often the (rounded) topological charge changes along the chains (rows chain-minor)."""
    q = theory.gauge.observables(x)["topological_charge"].round().reshape(-1, chains)
    return int((q[1:] != q[:-1]).sum())


def ess_per_proposal(log_w: torch.Tensor | None) -> float | None:
    if log_w is None or log_w.numel() == 0:
        return None
    lw = log_w.double()
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)) / lw.numel())


def quenched_kappa_c(beta: float, L: int, n: int, seed: int) -> tuple[float, float]:
    """``1 / max Re lambda`` over the eigenvalues ``lambda`` of the hopping matrix ``H`` on ``n`` pure-gauge
    ``L x L`` configurations (plaquette prior at ``beta``): median and spread (half the 16-84% range). Below it
    ``D = 1 - kappa H`` has no eigenvalue with negative real part; the physical branch's edge is where the
    smallest singular value of ``D`` dips (free field: 1/4 as ``L -> infinity``)."""
    lat = Lattice((L, L))
    theory = SchwingerModel(SchwingerParams(beta, 0.25), lat)
    theta, _ = U1PlaquettePrior(lat, beta).sample(n, make_generator(seed, 9))
    h = dense_matrix(theory.dirac.hop, u1_links(theta), theory.dirac.field_shape)
    ev = torch.linalg.eigvals(h)
    k = (1.0 / ev.real.max(dim=1).values).numpy()
    lo, med, hi = np.percentile(k, [16, 50, 84])
    return float(med), float((hi - lo) / 2)


def plaquette_model(L: int, beta: float, layers: int, hidden: list[int]) -> FlowModel:
    lat = Lattice((L, L))
    return make_u1_equivariant_flow(
        lat, layers, "ncp", hidden=tuple(hidden), zero_init=True, prior=U1PlaquettePrior(lat, beta)
    )


def train_full(theory: SchwingerModel, args: argparse.Namespace) -> tuple[FlowModel, float, int, float]:
    """Couplings on the plaquette prior, trained ``args.train_seconds`` on ``train.target = "full"``."""
    torch.manual_seed(args.seed)
    model = plaquette_model(theory.lattice.shape[0], theory.beta, args.layers, args.hidden)
    action = training_action(
        theory, "pf-flow-mcmc", "full", generator=make_generator(args.seed, 7), n_noise=args.train_noise
    )
    trainer = ReverseKLTrainer(
        model, lambda x: -action(x), batch_size=args.train_batch, lr=args.lr, generator=make_generator(args.seed, 1)
    )
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.train_seconds:
        trainer.train_step()
    model.requires_grad_(False)
    ess = float(np.mean(trainer.history.ess[-20:]))
    return model, time.perf_counter() - t0, trainer.step, ess


def run_flow(name: str, theory: SchwingerModel, model: FlowModel, n: int, args, *, pf: bool, train_s: float) -> Result:
    # dense determinants of 2V x 2V matrices: smaller batches at L = 16 (memory)
    batch = min(args.flow_batch if pf or theory.lattice.volume <= 64 else 25, n)
    if pf:
        sampler = PseudofermionFlowMCMC.for_theory(
            theory,
            model,
            batch_size=batch,
            generator=make_generator(args.seed, 3),
            even_odd=True,
            hasenbusch_kappas=(args.hasenbusch,),
            tol=1e-8,
            dense_fallback=True,
        )
    else:
        log_p = lambda th: -theory.action(th)  # noqa: E731
        sampler = FlowMCMC(model, log_p, batch_size=batch, generator=make_generator(args.seed, 2))
    sampler.run(batch)  # warm-up (start from an accepted proposal)
    t0 = time.perf_counter()
    b = sampler.run(n)
    dt = (time.perf_counter() - t0) / n
    cg = float(sampler.last_run_cg_iterations.double().sum(dim=1).mean()) if pf else 0.0
    row = analyse(name, theory, b.x, b.accepted.double().mean().item(), dt, cg, 1)
    return Result(row, ess_per_proposal(b.proposal_log_w), train_s, q_changes(theory, b.x, 1))


def run_hmc(theory: SchwingerModel, chains: int, n_traj: int, args: argparse.Namespace, tol: float) -> Result:
    gen = make_generator(args.seed, 4)
    x0, _ = U1PlaquettePrior(theory.lattice, theory.beta).sample(chains, gen)  # pure-gauge start
    hmc = PseudofermionHMC.for_theory(
        theory,
        x0,
        step_size=1.0 / args.hmc_steps,
        n_steps=args.hmc_steps,
        generator=gen,
        even_odd=True,
        hasenbusch_kappas=(args.hasenbusch,),
        tol=tol,
        step_jitter=0.1,
    )
    hmc.run(args.hmc_therm)
    t0 = time.perf_counter()
    b = hmc.run(n_traj)
    dt = (time.perf_counter() - t0) / (n_traj * chains)
    cg = float(hmc.last_run_cg_iterations.double().mean())
    name = f"PF-HMC e/o + Hasenbusch (CG {tol:g})"
    row = analyse(name, theory, b.x, b.accepted.double().mean().item(), dt, cg, chains)
    return Result(row, None, 0.0, q_changes(theory, b.x, chains))


def print_table(results: list[Result]) -> None:
    print(
        f"{'sampler':<34} {'acc':>7} {'ESS':>7} {'ms/step':>8} {'tau plaq':>9} {'tau Q':>8} {'ms/ind plaq':>11}"
        f" {'ms/ind Q':>9} {'+train':>9} {'CG':>6} {'dQ':>5}  plaquette      <Q^2>"
    )
    for r in results:
        w = r.row
        star = "*" if w.bounded else " "
        ess = f"{r.ess:.4f}" if r.ess is not None else "-"
        print(
            f"{w.sampler:<34} {w.acceptance:>7.4f} {ess:>7} {w.ms_per_step:>8.2f} {w.tau_plaq:>8.1f}{star}"
            f" {w.tau_q:>8.1f} {w.ms_per_indep:>11.1f} {r.ms_per_indep_q():>9.1f}"
            f" {r.ms_per_indep_q_with_training():>9.1f} {w.cg:>6.0f} {r.q_changes:>5}"
            f"  {w.plaquette[0]:.4f}({1e4 * w.plaquette[1]:.0f})  {w.q2[0]:.3f}({1e3 * w.q2[1]:.0f})"
        )


def benchmark_point(beta: float, kappa: float, L: int, args: argparse.Namespace) -> None:
    theory = SchwingerModel(SchwingerParams(beta, kappa), Lattice((L, L)))
    n_exact, n_pf = args.exact_samples[str(L)], args.pf_samples[str(L)]
    print(f"\n## L = {L}, beta = {beta}, kappa = {kappa}", flush=True)
    results = []
    if not args.hmc_only:
        model, t_train, steps, ess = train_full(theory, args)
        est = (
            "dense logdet"
            if L * L <= theory.dense_max_volume
            else f"stochastic logdet gradient ({args.train_noise} Z2)"
        )
        print(f"# trained {steps} steps in {t_train:.0f} s on the full target ({est}); batch ESS {ess:.3f}", flush=True)
        prior = FlowModel(U1PlaquettePrior(theory.lattice, beta), [])
        jobs = (
            ("flow-MCMC exact det, prior", prior, n_exact, False, 0.0),
            ("flow-MCMC exact det, trained", model, n_exact, False, t_train),
            ("pf-flow-MCMC e/o+HB, prior", prior, n_pf, True, 0.0),
            ("pf-flow-MCMC e/o+HB, trained", model, n_pf, True, t_train),
        )
        for name, m, n, pf, ts in jobs:
            try:
                results.append(run_flow(name, theory, m, n, args, pf=pf, train_s=ts))
            except ConvergenceError as exc:
                print(f"# {name}: {exc}")
    for tol in (args.hmc_tol, 100 * args.hmc_tol):  # CG on D^dag D can stall near kappa_c: one looser retry
        try:
            results.append(run_hmc(theory, args.hmc_chains[str(L)], args.hmc_traj[str(L)], args, tol))
            break
        except ConvergenceError as exc:
            print(f"# PF-HMC, CG tol {tol:g}: {exc}", flush=True)
    print_table(results)
    if results and results[-1].row.sampler.startswith("PF-HMC"):
        hmc = results[-1]
        for r in results[:-1]:
            print(
                f"cost ratio PF-HMC / {r.row.sampler}: plaquette {hmc.row.ms_per_indep / r.row.ms_per_indep:.3g},"
                f" Q {hmc.ms_per_indep_q() / r.ms_per_indep_q():.3g},"
                f" Q incl. training (1000 indep.) {hmc.ms_per_indep_q() / r.ms_per_indep_q_with_training():.3g}"
            )
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="lattice sizes of part (a)")
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--scan-betas", type=float, nargs="+", default=[5.0])
    p.add_argument("--scan-kappa-offset", type=float, default=0.006, help="kappa = kappa_c(quenched) - offset")
    p.add_argument("--scan-hmc-traj", type=int, default=250, help="PF-HMC trajectories per chain in part (b)")
    p.add_argument("--hasenbusch", type=float, default=0.2, help="kappa of the heavier Hasenbusch fermion")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, nargs="+", default=[8, 8])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--train-noise", type=int, default=1)
    p.add_argument("--train-seconds", type=float, default=60.0)
    p.add_argument("--flow-batch", type=int, default=100)
    p.add_argument("--hmc-steps", type=int, default=6, help="Omelyan steps per unit trajectory")
    p.add_argument("--hmc-therm", type=int, default=20)
    p.add_argument("--hmc-tol", type=float, default=1e-10, help="CG tolerance of PF-HMC (retried 100x looser)")
    p.add_argument("--hmc-only", action="store_true", help="PF-HMC alone (no training, no flow samplers)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    args.exact_samples = {"8": 2000, "16": 400}
    args.pf_samples = {"8": 3000, "16": 2000}
    args.hmc_chains = {"8": 16, "16": 8}
    args.hmc_traj = {"8": 100, "16": 80}
    sizes = args.sizes
    scan_L = 16
    if args.quick:
        sizes, scan_L, args.train_seconds, args.hmc_therm = [4], 4, 5.0, 5
        args.exact_samples = args.pf_samples = {"4": 300}
        args.hmc_chains, args.hmc_traj, args.scan_hmc_traj = {"4": 4}, {"4": 10}, 10
    torch.set_num_threads(args.threads)
    print(
        f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, float64"
    )
    print(
        f"# flow: plaquette prior at the gauge beta + {args.layers} NCP couplings (hidden {args.hidden}), trained"
        f" {args.train_seconds:.0f} s (batch {args.train_batch}, lr {args.lr}); Hasenbusch kappa' = {args.hasenbusch};"
        f" PF-HMC Omelyan {args.hmc_steps} steps, trajectory length 1"
    )
    if args.part in ("a", "both"):
        print("\n# (a) the seed paper's point: beta = 2, kappa = 0.276")
        for L in sizes:
            benchmark_point(2.0, 0.276, L, args)
    if args.part in ("b", "both"):
        print("\n# (b) L = 16 near the critical kappa at larger beta")
        for beta in args.scan_betas:
            t0 = time.perf_counter()
            kc, dk = quenched_kappa_c(beta, scan_L, 8, args.seed)
            kappa = round(kc - args.scan_kappa_offset, 4)
            print(
                f"# beta = {beta}: quenched kappa_c ~ {kc:.4f} +- {dk:.4f} ({scan_L}x{scan_L}, 1 / max Re eigenvalue"
                f" of H, median and 16-84% half-range; {time.perf_counter() - t0:.0f} s); kappa = {kappa}",
                flush=True,
            )
            args.hmc_traj[str(scan_L)] = args.scan_hmc_traj
            benchmark_point(beta, kappa, scan_L, args)


if __name__ == "__main__":
    main()
