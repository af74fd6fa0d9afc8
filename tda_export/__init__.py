"""tda-export: TDA (Threshold-based Dynamic Activation) sparse-MLP decoding, exported for deployment."""
__version__ = "0.1.0"
