"""TVT: Transfer VAE Training for fine-structure-preserving real-world image super-resolution.

Reference reproduction of TVT and its baselines (OSEDiff, StableSR) as a cached, tracked
pipeline. Importing this package is cheap; heavy libraries are imported where used.
"""

__version__ = "0.1.0"
