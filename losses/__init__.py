"""t2vu.losses."""
