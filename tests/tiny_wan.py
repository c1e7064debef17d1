"""A tiny Wan 2.1 text-to-video pipeline built from configs, saved with save_pretrained.

Tests load it back by path, through the same ``from_pretrained`` code a user's
``./Wan2.1-T2V-1.3B-Diffusers`` folder takes. Nothing is downloaded: the T5
(Unigram) tokenizer is trained in-process on the word list of :mod:`tiny`, the
UMT5 encoder is built from a ``UMT5Config``.

Sizes: 32x32 pixels, 9 frames -> latents ``[4, 3, 4, 4]`` -> 2x2 video tokens per
frame (12 video tokens); 2 heads of width 8; UMT5 width 16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tiny import WORDS, make_tokenizer


def build_tiny_wan(path: Path, *, layers: int = 2, heads: int = 2, head_dim: int = 8, scheduler: str = "unipc",
                   flow_shift: float = 3.0, seed: int = 0, boundary_ratio: Optional[float] = None) -> Path:
    """Save a tiny ``WanPipeline`` folder at ``path`` and return it.

    ``scheduler``: ``"unipc"`` (what the released Wan 2.1 folders hold: ``UniPCMultistepScheduler`` with flow
    sigmas and ``flow_shift``) or ``"euler"`` (``FlowMatchEulerDiscreteScheduler`` with ``shift``).
    ``boundary_ratio``: a Wan 2.2 A14B-style pipeline with a second expert ``transformer_2`` (other weights, same
    config) serving the timesteps below ``boundary_ratio * 1000``.
    """
    import torch
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline,
                           WanTransformer3DModel)
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    text_width, z = 16, 4
    def make_transformer():
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=z,
            out_channels=z, text_dim=text_width, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
        # randomise everything (fresh init leaves some projections small) so every path reaches the output
        with torch.no_grad():
            for p in transformer.parameters():
                p.normal_(0.0, 0.3)
        return transformer

    transformer = make_transformer()
    transformer_2 = make_transformer() if boundary_ratio is not None else None
    vae = AutoencoderKLWan(base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 2.0])
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer) + 8, d_model=text_width, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=sched, transformer_2=transformer_2, boundary_ratio=boundary_ratio)
    pipe.save_pretrained(path)
    return Path(path)


__all__ = ["WORDS", "build_tiny_wan"]
