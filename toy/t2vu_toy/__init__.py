"""t2vu_toy: a tiny text-to-video world whose concepts deterministic judges can measure."""
