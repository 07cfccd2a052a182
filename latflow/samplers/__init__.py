"""Samplers: flow-MCMC (independence Metropolis) and HMC. They never open files."""

from .flow_mcmc import FlowMCMC
from .hmc import HMC, action_force
from .records import SampleBlock, state_from_bytes, state_to_bytes

__all__ = ["FlowMCMC", "HMC", "SampleBlock", "action_force", "state_from_bytes", "state_to_bytes"]

from .pf_flow_mcmc import JointProposal, JointTarget, PseudofermionFlowMCMC, exact_determinant_flow_mcmc  # noqa: E402

__all__ += ["PseudofermionFlowMCMC", "JointProposal", "JointTarget", "exact_determinant_flow_mcmc"]
