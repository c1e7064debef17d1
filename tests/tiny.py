"""Tiny CogVideoX pipelines built from configs, saved with save_pretrained.

Tests load them back by path, through the same ``from_pretrained`` code a
user's ``./CogVideoX-5b`` folder takes. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the of in on at and with to is person man woman people couple dog cat car tree park beach forest "
    "room lake bed street city red blue green yellow orange magenta purple circle square triangle moving left "
    "right up down nude naked topless nudity clothing clothed swimsuit suit dress walking standing sitting "
    "swimming dancing running lying sunset night day small big video photo painting style van gogh apple"
).split()


def make_tokenizer(words=WORDS):
    """A T5 tokenizer whose Unigram vocabulary is trained in-process on ``words``."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=len(words) * 3 + 60, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", shrinking_factor=0.9)
    corpus = [" ".join(words[i:i + 6]) for i in range(len(words))] + list(words)
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    vocab = [tuple(item) for item in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_cogvideox(path: Path, *, layers: int = 2, heads: int = 2, head_dim: int = 16,
                         text_len: int = 16, rotary: bool = True, patch_size_t=None, seed: int = 0) -> Path:
    """Save a tiny CogVideoX pipeline folder at ``path`` and return it.

    Pixel size 32x32, 9 frames -> latents [3, 4, 4, 4] -> 2x2 tokens per frame.
    """
    import torch
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=16, num_layers=layers, sample_width=4, sample_height=4,
        sample_frames=9, patch_size=2, patch_size_t=patch_size_t, temporal_compression_ratio=4,
        max_text_seq_length=text_len, use_rotary_positional_embeddings=rotary,
        use_learned_positional_embeddings=False,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing", snr_shift_scale=1.0)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(WORDS) + 48, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    text_encoder.eval()
    pipe = CogVideoXPipeline(tokenizer=make_tokenizer(), text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(path)
    return Path(path)
