"""A tiny HunyuanVideo pipeline built from configs, saved with save_pretrained.

Tests load it back by path, through the same ``from_pretrained`` code a user's
``./HunyuanVideo`` folder takes. Nothing is downloaded: both tokenizers are
trained in-process with the ``tokenizers`` library on the word list of
:mod:`tiny` (plus the words of the default prompt template).

Sizes: 32x32 pixels, 9 frames -> latents ``[4, 3, 4, 4]`` -> 2x2 video tokens per
frame (12 video tokens); 2 heads of width 8; Llama width 16, CLIP width 8.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tiny import WORDS

#: the special tokens of Llama-3's chat template that HunyuanVideo's prompt template uses
HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _corpus(extra: str = "") -> list[str]:
    return ([" ".join(WORDS[i:i + 6]) for i in range(len(WORDS))] + list(WORDS) + ([extra] if extra else [])) * 4


def _bpe_parts(tok) -> tuple[dict, list]:
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def make_llama_tokenizer(words=WORDS):
    """A Llama fast tokenizer (BPE over ``▁``-marked words, ``<|begin_of_text|>`` prepended, right padding)
    whose vocabulary is trained on ``words`` and the default template's text; the template's header tokens
    are special tokens, as in Llama-3."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    template_words = re.sub(r"<\|[a-z_]+\|>", " ", DEFAULT_PROMPT_TEMPLATE["template"])
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>"],
        initial_alphabet=list(LETTERS + "{}\n:.,'!?0123456789-"))
    tok.train_from_iterator(_corpus(template_words), trainer=trainer)
    vocab, merges = _bpe_parts(tok)
    llama = LlamaTokenizerFast(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<|begin_of_text|>",
                               eos_token="<|end_of_text|>", pad_token="<pad>", padding_side="right",
                               add_bos_token=True)
    llama.add_special_tokens({"additional_special_tokens": list(HEADER_TOKENS)})
    return llama


def make_clip_tokenizer(words=WORDS):
    """A CLIP tokenizer (byte-level BPE, ``</w>`` word ends, lower-cased, 77 tokens) trained on ``words``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=520, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    vocab, merges = _bpe_parts(tok)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_hunyuanvideo(path: Path, *, guidance_embeds: bool = True, layers: int = 1, single_layers: int = 2,
                            seed: int = 0, text_len: int = 16, heads: int = 2, head_dim: int = 8) -> Path:
    """Save a tiny ``HunyuanVideoPipeline`` folder at ``path`` and return it.

    ``guidance_embeds``: a guidance-distilled transformer (embedded guidance, like HunyuanVideo) or not (true
    two-pass CFG); ``layers`` / ``single_layers``: double- and single-stream blocks; ``text_len``: the
    ``max_sequence_length`` the tests encode with (the Llama encoder's positions cover template + text_len).
    """
    import torch
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = make_llama_tokenizer(), make_clip_tokenizer()
    llama_width, clip_width = 16, 8
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        qk_norm="rms_norm", guidance_embeds=guidance_embeds, text_embed_dim=llama_width,
        pooled_projection_dim=clip_width, rope_theta=256.0, rope_axes_dim=(2, 2, head_dim - 4))
    # Fresh diffusers init leaves some projections at zero (adaLN gates): randomise everything so every
    # path (text tokens, guidance, pooled projection) reaches the output.
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0.0, 0.3)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=llama_width, intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128 + text_len,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=clip_width, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id, pad_token_id=tokenizer_2.pad_token_id)).eval()
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(path)
    return Path(path)
