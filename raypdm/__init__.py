"""raypdm: red-team protective perturbations on personalized diffusion models, at cluster scale on Ray."""

__version__ = "0.1.0"
