"""t2vu.concept_sources."""
