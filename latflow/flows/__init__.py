"""Normalising flows: coupling layers, nets and models."""

from .layers import AffineCoupling
from .model import FlowModel, make_affine_flow, model_sha256
from .nets import PeriodicConvNet

__all__ = ["AffineCoupling", "FlowModel", "PeriodicConvNet", "make_affine_flow", "model_sha256"]

# gauge-equivariant U(1) flows (Kanwar et al. 2020) and circle bijections
from .circular import CircularSpline, NCPMixture  # noqa: E402
from .gauge_layers import GaugeEquivariantCoupling, make_u1_equivariant_flow, u1_masks  # noqa: E402

__all__ += ["CircularSpline", "GaugeEquivariantCoupling", "NCPMixture", "make_u1_equivariant_flow", "u1_masks"]
from .sun_layers import SUNHaarPrior, SUNSpectralCoupling, make_sun_spectral_flow  # noqa: E402, F401
