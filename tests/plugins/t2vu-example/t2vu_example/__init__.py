"""A third-party t2vu plugin: one component of every kind, registered by entry point."""
