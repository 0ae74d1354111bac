"""diffrep: diffusion models as representation learners, as a reproducible pipeline."""

__version__ = "0.1.0"
