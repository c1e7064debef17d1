"""t2vu: erase concepts from text-to-video diffusion transformers."""
__version__ = "0.1.0"
