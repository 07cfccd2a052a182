"""Samplers: flow-MCMC (independence Metropolis), HMC, and their Nf = 2 pseudofermion versions.

They never open files.
"""

from .flow_mcmc import FlowMCMC
from .hmc import HMC, action_force
from .pf_flow_mcmc import JointProposal, JointTarget, PseudofermionFlowMCMC, exact_determinant_flow_mcmc
from .pf_hmc import PseudofermionHMC
from .records import SampleBlock, state_from_bytes, state_to_bytes

__all__ = [
    "FlowMCMC",
    "HMC",
    "JointProposal",
    "JointTarget",
    "PseudofermionFlowMCMC",
    "PseudofermionHMC",
    "SampleBlock",
    "action_force",
    "exact_determinant_flow_mcmc",
    "state_from_bytes",
    "state_to_bytes",
]
