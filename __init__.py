"""t2vu: erase concepts from text-to-video diffusion transformers."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import t2vu` stays light (no torch): t2vu.load_eraser(pipe, "eraser.safetensors").
    if name == "load_eraser":
        from t2vu.core.eraser_load import load_eraser

        return load_eraser
    raise AttributeError(f"module 't2vu' has no attribute {name!r}")
