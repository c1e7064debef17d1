"""t2vu.backbones."""
