"""Schwinger model (2D U(1), Nf = 2 Wilson), beta = 2: flow-MCMC with exact determinants and with
pseudofermions against pseudofermion HMC, in one process.

For each lattice L and hopping parameter kappa:

* one gauge-equivariant flow (NCP couplings) is trained by reverse KL, first on the pure-gauge
  action, then on the exact effective action ``S_g - log det(D^dag D)`` (dense, on an 8x8
  lattice; the convolutional couplings are used unchanged on 16x16); training time is printed;
* flow-MCMC with the **exact determinant** (dense ``logdet``: the baseline of the paper);
* **pseudofermion flow-MCMC** in the joint (U, phi) space: the flow proposes U, a gauge-covariant
  even/odd triangular conditional proposes phi given U, Metropolis on the joint target (CG solves,
  no determinants): plain, even/odd, and even/odd with one Hasenbusch factor;
* **pseudofermion HMC** (batched chains, Omelyan, trajectory length 1): plain (no even/odd, no
  Hasenbusch, the REFERENCES.md baseline) and even/odd with one Hasenbusch factor.

Printed per sampler: acceptance, wall time per Markov step per chain, tau_int of the plaquette and
of Q (known ``<Q> = 0``), cost per independent plaquette = time x 2 tau_int, CG iterations, and the
plaquette / <Q^2> measured. Independence samplers with acceptance a have tau_int >= 1/a - 1/2; when
the chain is too short to estimate tau_int, that bound is used and marked ``*``.

Dirac ``apply`` throughput against this machine's memory bandwidth and CG iterations against kappa
are measured by ``benchmarks/dirac_apply.py``.

Usage::

    python benchmarks/schwinger_flow_vs_hmc.py                       # the BENCHMARKS.md run
    python benchmarks/schwinger_flow_vs_hmc.py --quick               # a minute; checks the script runs
    python benchmarks/schwinger_flow_vs_hmc.py --sizes 8 --kappas 0.276
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch

from latflow.analysis import gamma_method
from latflow.flows.gauge_layers import make_u1_equivariant_flow
from latflow.gauge import UniformU1Prior
from latflow.lattice import Lattice
from latflow.rng import make_generator
from latflow.samplers import FlowMCMC, PseudofermionFlowMCMC
from latflow.samplers.pf_hmc import PseudofermionHMC
from latflow.theories.schwinger import SchwingerModel, SchwingerParams
from latflow.theories.u1 import U1GaugeAction, U1Params
from latflow.training import ReverseKLTrainer

BETA = 2.0


@dataclass
class Row:
    sampler: str
    acceptance: float
    ms_per_step: float
    tau_plaq: float
    tau_q: float
    bounded: bool
    cg: float
    plaquette: tuple[float, float]
    q2: tuple[float, float]

    @property
    def ms_per_indep(self) -> float:
        return self.ms_per_step * 2 * max(self.tau_plaq, 0.5)


def build_flow(L: int, args: argparse.Namespace) -> torch.nn.Module:
    return make_u1_equivariant_flow(
        Lattice((L, L)), args.layers, "ncp", hidden=tuple(args.hidden), zero_init=True, dtype=torch.float64
    )


def train_flow(kappa: float, args: argparse.Namespace) -> tuple[dict, float, int]:
    """Pure gauge first, then the exact effective action, on the training lattice."""
    lat = Lattice((args.train_L, args.train_L))
    torch.manual_seed(args.seed)
    model = build_flow(args.train_L, args)
    gauge = U1GaugeAction(U1Params(BETA), lat)
    full = SchwingerModel(SchwingerParams(BETA, kappa), lat)
    target = {"f": gauge.action}
    trainer = ReverseKLTrainer(
        model,
        lambda x: -target["f"](x),
        batch_size=args.train_batch,
        lr=args.lr,
        generator=make_generator(args.seed, 1),
        grad_clip=100.0,
    )
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < args.train_seconds:
        if elapsed > args.pure_gauge_fraction * args.train_seconds:
            target["f"] = full.action
        trainer.train_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, time.perf_counter() - t0, trainer.step


def analyse(name: str, theory: SchwingerModel, x: torch.Tensor, acc: float, dt: float, cg: float, n_chains: int) -> Row:
    obs = theory.gauge.observables(x)
    plaq = obs["plaquette"].numpy().reshape(-1, n_chains)
    q = obs["topological_charge"].round().numpy().reshape(-1, n_chains)
    rp = gamma_method([plaq[:, c] for c in range(n_chains)])
    rq = gamma_method([q[:, c] for c in range(n_chains)], known_mean=0.0)
    rq2 = gamma_method([q[:, c] ** 2 for c in range(n_chains)])
    tp, tq, bounded = rp.tau_int, rq.tau_int, False
    n_acc = acc * plaq.size
    if n_chains == 1 and n_acc < 30:  # too few accepted proposals to estimate tau_int
        tp = tq = 1 / max(acc, 1 / plaq.size) - 0.5
        bounded = True
    return Row(name, acc, 1e3 * dt, tp, tq, bounded, cg, (rp.mean, rp.err), (rq2.mean, rq2.err))


def run_flow_samplers(theory: SchwingerModel, state: dict, args: argparse.Namespace, L: int) -> list[Row]:
    model = build_flow(L, args)
    model.load_state_dict(state)
    rows = []
    n = args.flow_samples[str(L)]
    # exact determinant
    s = FlowMCMC(
        model, lambda th: -theory.action(th), batch_size=args.flow_batch, generator=make_generator(args.seed, 2)
    )
    s.run(args.flow_batch)
    t0 = time.perf_counter()
    b = s.run(n)
    rows.append(
        analyse(
            "flow, exact det", theory, b.x, b.accepted.double().mean().item(), (time.perf_counter() - t0) / n, 0.0, 1
        )
    )
    for name, eo, hb in (
        ("flow, pf plain", False, ()),
        ("flow, pf e/o", True, ()),
        ("flow, pf e/o + Hasenbusch", True, (args.hasenbusch,)),
    ):
        s = PseudofermionFlowMCMC.for_theory(
            theory,
            model,
            batch_size=args.flow_batch,
            generator=make_generator(args.seed, 3),
            even_odd=eo,
            hasenbusch_kappas=hb,
            tol=1e-8,
        )
        s.run(args.flow_batch)
        t0 = time.perf_counter()
        b = s.run(n)
        dt = (time.perf_counter() - t0) / n
        cg = float(s.last_run_cg_iterations.double().sum(dim=1).mean())
        rows.append(analyse(name, theory, b.x, b.accepted.double().mean().item(), dt, cg, 1))
    return rows


def run_pf_hmc(theory: SchwingerModel, args: argparse.Namespace, L: int) -> list[Row]:
    rows = []
    chains, n_traj = args.hmc_chains[str(L)], args.hmc_traj[str(L)]
    for name, eo, hb in (("PF-HMC plain", False, ()), ("PF-HMC e/o + Hasenbusch", True, (args.hasenbusch,))):
        gen = make_generator(args.seed, 4)
        x0, _ = UniformU1Prior(theory.lattice, dtype=torch.float64).sample(chains, gen)
        hmc = PseudofermionHMC.for_theory(
            theory,
            0.3 * x0,
            step_size=1.0 / args.hmc_steps,
            n_steps=args.hmc_steps,
            generator=gen,
            even_odd=eo,
            hasenbusch_kappas=hb,
            tol=1e-10,
            step_jitter=0.1,
        )
        hmc.run(args.hmc_therm)
        t0 = time.perf_counter()
        b = hmc.run(n_traj)
        dt = (time.perf_counter() - t0) / (n_traj * chains)
        cg = float(hmc.last_run_cg_iterations.double().mean())
        rows.append(analyse(name, theory, b.x, b.accepted.double().mean().item(), dt, cg, chains))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--kappas", type=float, nargs="+", default=[0.26, 0.276])
    p.add_argument("--hasenbusch", type=float, default=0.2, help="kappa of the heavier Hasenbusch fermion")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[8, 8])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-L", type=int, default=8)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--train-seconds", type=float, default=300.0)
    p.add_argument("--pure-gauge-fraction", type=float, default=0.6)
    p.add_argument("--flow-batch", type=int, default=100)
    p.add_argument("--hmc-steps", type=int, default=5, help="Omelyan steps per unit trajectory")
    p.add_argument("--hmc-therm", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=5)
    args = p.parse_args()
    args.flow_samples = {"8": 4000, "16": 1000}
    args.hmc_chains = {"8": 32, "16": 16}
    args.hmc_traj = {"8": 200, "16": 60}
    if args.quick:
        args.sizes, args.kappas, args.train_seconds = [4], [0.24], 10.0
        args.flow_samples, args.hmc_chains, args.hmc_traj, args.hmc_therm = {"4": 400}, {"4": 8}, {"4": 20}, 5
        args.train_L = 4
    torch.set_num_threads(args.threads)
    print(
        f"# machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, float64"
    )
    print(
        f"# beta = {BETA}; flow: {args.layers} NCP couplings, hidden {args.hidden};"
        f" Hasenbusch kappa' = {args.hasenbusch}"
    )
    for kappa in args.kappas:
        state, t_train, steps = train_flow(kappa, args)
        print(
            f"\n# kappa = {kappa}: flow trained {steps} steps in {t_train:.0f} s on {args.train_L}^2"
            f" ({args.pure_gauge_fraction:.0%} of the time on the pure-gauge action, then the exact effective action)"
        )
        for L in args.sizes:
            theory = SchwingerModel(SchwingerParams(BETA, kappa), Lattice((L, L)))
            rows = run_flow_samplers(theory, state, args, L) + run_pf_hmc(theory, args, L)
            print(f"\n## L = {L}, beta = {BETA}, kappa = {kappa}")
            print(
                f"{'sampler':<27} {'acc':>7} {'ms/step':>9} {'tau plaq':>9} {'tau Q':>8} {'ms/indep':>10}"
                f" {'CG its':>7}  plaquette         <Q^2>"
            )
            for r in rows:
                star = "*" if r.bounded else " "
                print(
                    f"{r.sampler:<27} {r.acceptance:>7.4f} {r.ms_per_step:>9.3f} {r.tau_plaq:>8.1f}{star}"
                    f" {r.tau_q:>8.1f} {r.ms_per_indep:>10.1f} {r.cg:>7.0f}"
                    f"  {r.plaquette[0]:.4f}({1e4 * r.plaquette[1]:.0f})"
                    f"  {r.q2[0]:.3f}({1e3 * r.q2[1]:.0f})"
                )
            hmc = rows[-2]
            for r in rows[:4]:
                print(f"cost ratio PF-HMC plain / {r.sampler}: {hmc.ms_per_indep / r.ms_per_indep:.3g}")


if __name__ == "__main__":
    main()
