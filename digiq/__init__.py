"""digiq: Digi-Q (arXiv 2502.15760) made reproducible — Q-value functions on frozen VLM features."""

__version__ = "0.1.0"
