"""t2vu.core."""
