"""t2vu.plugins."""
