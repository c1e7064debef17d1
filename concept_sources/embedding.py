"""``rank_by: embedding``: drop candidates too close to the target in a text-embedding space.

The embedding is the attention-masked mean of an encoder's last hidden states;
closeness is cosine similarity. The encoder comes from a local folder:

- a diffusers pipeline folder with ``text_encoder/`` and ``tokenizer/`` (the
  backbone's own text encoder, e.g. ``./CogVideoX-5b``'s T5), or
- a model folder with a tokenizer and an encoder (a sentence-embedding model
  such as all-MiniLM, or any T5/BERT-like checkpoint).

Imports torch and transformers: only loaded when a spec asks for this ranking.
"""

from __future__ import annotations

import threading
from pathlib import Path

from t2vu.core.errors import T2VUError

_lock = threading.Lock()
_encoders: dict[str, tuple] = {}


def _folders(path: Path) -> tuple[Path, Path]:
    """(tokenizer folder, model folder) for a pipeline folder or a plain model folder."""
    path = Path(path)
    if not path.is_dir():
        raise T2VUError(f"embedding_model {path} is not a folder: give a local model folder (a sentence-"
                        f"embedding model, or a pipeline folder with text_encoder/ and tokenizer/)")
    if (path / "text_encoder").is_dir():
        tokenizer = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        return tokenizer, path / "text_encoder"
    return path, path


def load_encoder(path: Path):
    """(tokenizer, encoder, device) for ``path``, loaded once per process."""
    key = str(Path(path).resolve())
    with _lock:
        if key in _encoders:
            return _encoders[key]
        tok_dir, model_dir = _folders(path)
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            config = AutoConfig.from_pretrained(model_dir)
            if getattr(config, "is_encoder_decoder", False) or config.model_type in ("t5", "umt5", "mt5"):
                model = T5EncoderModel.from_pretrained(model_dir, dtype=dtype)
            else:
                model = AutoModel.from_pretrained(model_dir, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise T2VUError(f"cannot load an embedding model from {path}: {exc}") from None
        model.to(device).eval()
        _encoders[key] = (tokenizer, model, device)
        return _encoders[key]


def embed(texts: list[str], path: Path):
    """L2-normalised mean-pooled embeddings, shape ``[len(texts), hidden]`` (float32, CPU)."""
    import torch

    tokenizer, model, device = load_encoder(path)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()  # [B, L, H]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu()


def similarities(target: str, candidates: list[str], path: Path) -> list[float]:
    """Cosine similarity of each candidate to the target."""
    vectors = embed([target, *candidates], path)
    return (vectors[1:] @ vectors[0]).tolist()


def rank_by_embedding(target: str, candidates: list[str], path: Path, max_similarity: float) -> list[str]:
    """Candidates with similarity below ``max_similarity``, most similar first (ties: original order)."""
    sims = similarities(target, candidates, path)
    kept = [(-round(s, 6), i, c) for i, (c, s) in enumerate(zip(candidates, sims)) if s < max_similarity]
    return [c for _, _, c in sorted(kept)]
