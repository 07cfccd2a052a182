"""Samplers: flow-MCMC (independence Metropolis) and HMC. They never open files."""

from .flow_mcmc import FlowMCMC
from .hmc import HMC, action_force
from .records import SampleBlock, state_from_bytes, state_to_bytes

__all__ = ["FlowMCMC", "HMC", "SampleBlock", "action_force", "state_from_bytes", "state_to_bytes"]
