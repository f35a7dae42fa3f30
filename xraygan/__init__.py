"""xraygan: rebalance imbalanced medical image datasets with GAN images, and measure honestly."""

__version__ = "0.1.0"
