"""Normalising flows: coupling layers, nets and models."""

from .layers import AffineCoupling
from .model import FlowModel, make_affine_flow, model_sha256
from .nets import PeriodicConvNet

__all__ = ["AffineCoupling", "FlowModel", "PeriodicConvNet", "make_affine_flow", "model_sha256"]
