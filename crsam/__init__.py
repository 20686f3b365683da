"""CR-SAM training, PAC-Bayes certificates and curvature measurements.

Importing ``crsam`` loads nothing heavy: ``crsam.theory`` works without torch, and the
torch-based modules (``crsam.optim``, ``crsam.curvature``, ...) are imported on demand.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
