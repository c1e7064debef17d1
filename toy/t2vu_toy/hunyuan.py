"""The toy world on HunyuanVideo: a second base model, built from ``HunyuanVideoTransformer3DModel``.

Flow matching (x_t = (1 - s) x0 + s noise, the model predicts noise - x0), double- then single-stream
blocks with the video tokens first and the text last, a Llama text encoder (through a prompt template)
and a CLIP pooled projection: everything that differs from the CogVideoX toy, in pixel space with the
identity codec. Latents are the clips scaled to [-1, 1] in HunyuanVideo's layout ``[3, F, H, W]``. The
transformer has no guidance embedding: the toy guides with two-pass classifier-free guidance, which the
``hunyuanvideo`` backbone does for such a transformer.

The folder is a ``HunyuanVideoPipeline`` folder without ``vae/`` (``transformer/``, ``text_encoder/``,
``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``, ``scheduler/``, ``model_index.json``) plus
``world.json`` and ``training.json``. Both tokenizers are written directly from the world's words (every
word one token), so building is deterministic.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from t2vu.backbones.hunyuanvideo_model import HunyuanVideoBackbone
from t2vu_toy.model import FitRecipe, check_toy_folder, fit, save_transformer
from t2vu_toy.world import DEFAULT_WORLD, World, from_latent, to_latent

#: The shipped HunyuanVideo-architecture base (inside the package, so the wheel carries it).
BASE_PATH = Path(__file__).resolve().parent / "base_hunyuanvideo"
#: the toy's prompt template: the caption itself (no system prompt to crop)
TEMPLATE = "{}"
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"


@dataclass(frozen=True)
class HunyuanRecipe(FitRecipe):
    """How the shipped HunyuanVideo toy base was trained (``t2vu toy build --arch hunyuanvideo``)."""

    steps: int = 10000
    # transformer
    double_layers: int = 1
    single_layers: int = 3
    refiner_layers: int = 1
    heads: int = 4
    head_dim: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 4
    #: RoPE dimensions per axis (frames, height, width; they sum to head_dim) and its base
    rope_axes: tuple = (8, 4, 4)
    rope_theta: float = 256.0
    text_len: int = 8
    shift: float = 1.0
    # frozen random text encoders
    text_dim: int = 32
    text_layers: int = 3  # hidden_states[-3] (the pipeline skips two layers): the output of layer 1
    clip_dim: int = 32
    clip_layers: int = 1


# -- tokenizers: every world word one token ----------------------------------------------------
def _spelling(words: list[str]) -> tuple[dict, list]:
    """BPE vocabulary and merges that make each ``▁word`` one token: every merge extends a ``▁``-prefix by one
    character, so words never share a merge that could split another; single characters stay as the fallback
    for words outside the world."""
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token in ["\u2581", *LETTERS]:
        vocab.setdefault(token, len(vocab))
    for word in dict.fromkeys(words):
        token = "\u2581"
        for ch in word:
            if (token, ch) not in merges:
                merges.append((token, ch))
            token += ch
            vocab.setdefault(token, len(vocab))
    return vocab, merges


def make_llama_tokenizer(world: World = DEFAULT_WORLD):
    """A Llama fast tokenizer (BPE over ``▁``-marked words, ``<|begin_of_text|>`` first, right padding)."""
    from transformers import LlamaTokenizerFast

    specials = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>"]
    vocab, merges = _spelling(world.words())
    vocab = {**{s: i for i, s in enumerate(specials)}, **{k: v + len(specials) for k, v in vocab.items()}}
    return LlamaTokenizerFast(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<|begin_of_text|>",
                              eos_token="<|end_of_text|>", pad_token="<pad>", padding_side="right",
                              add_bos_token=True)


def make_clip_tokenizer():
    """A CLIP tokenizer (lower-cased, 77 tokens) that spells every word by its characters (no merges): the
    pooled projection is a function of the caption's letters."""
    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"] + [t for ch in LETTERS for t in (ch, ch + "</w>")]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


# -- components -------------------------------------------------------------------------------------
def make_scheduler(recipe: HunyuanRecipe):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=recipe.shift)


def make_text_encoders(tokenizer, tokenizer_2, recipe: HunyuanRecipe):
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    llama = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.text_dim, intermediate_size=recipe.text_dim * 2,
        num_hidden_layers=recipe.text_layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=recipe.clip_dim, intermediate_size=recipe.clip_dim * 2,
        num_hidden_layers=recipe.clip_layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
        pad_token_id=tokenizer_2.pad_token_id)).eval()
    return llama, clip


def make_transformer(recipe: HunyuanRecipe):
    from diffusers import HunyuanVideoTransformer3DModel

    if sum(recipe.rope_axes) != recipe.head_dim:
        raise ValueError(f"rope_axes {recipe.rope_axes} must sum to head_dim {recipe.head_dim}")
    return HunyuanVideoTransformer3DModel(
        in_channels=3, out_channels=3, num_attention_heads=recipe.heads, attention_head_dim=recipe.head_dim,
        num_layers=recipe.double_layers, num_single_layers=recipe.single_layers,
        num_refiner_layers=recipe.refiner_layers, mlp_ratio=recipe.mlp_ratio, patch_size=recipe.patch_size,
        patch_size_t=1, qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=recipe.text_dim,
        pooled_projection_dim=recipe.clip_dim, rope_axes_dim=tuple(recipe.rope_axes),
        rope_theta=recipe.rope_theta)


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "HunyuanVideoPipeline",
        "_diffusers_version": diffusers.__version__,
        "_t2vu_note": "pixel-space toy world model, no VAE (latents are clips in [-1, 1], [3, F, H, W]); "
                      "load it with the t2vu-toy `toy_hunyuanvideo` backbone",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "LlamaModel"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "LlamaTokenizerFast"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "vae": [None, None],
    }


def clips_to_latents(clips: torch.Tensor) -> torch.Tensor:
    """Clips ``[B, F, 3, H, W]`` in [0, 1] -> latents ``[B, 3, F, H, W]`` in [-1, 1]."""
    return to_latent(clips).permute(0, 2, 1, 3, 4)


# -- training ---------------------------------------------------------------------------------------
def build_base(out: Path, *, recipe: HunyuanRecipe = HunyuanRecipe(), world: World = DEFAULT_WORLD,
               progress: Optional[Callable[[int, int, float], None]] = None,
               checkpoint_every: int = 0, log_every: int = 50, log_file: Optional[Path] = None) -> Path:
    """Build and train the HunyuanVideo toy base into ``out``; deterministic given ``recipe.seed``.

    Flow-matching loss ``||v(x_t, t, c) - (noise - x0)||^2`` with ``sigma`` drawn like the backbone's training
    timesteps (the scheduler's shift on uniform times), captions from :meth:`World.batches` (which include
    the empty caption, so the model also learns the unconditional prediction CFG needs). EMA weights are
    saved, as for the CogVideoX toy.
    """
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(recipe.seed)
    tokenizer, tokenizer_2 = make_llama_tokenizer(world), make_clip_tokenizer()
    llama, clip = make_text_encoders(tokenizer, tokenizer_2, recipe)
    transformer = make_transformer(recipe)
    scheduler = make_scheduler(recipe)
    tokenizer.save_pretrained(out / "tokenizer")
    tokenizer_2.save_pretrained(out / "tokenizer_2")
    llama.save_pretrained(out / "text_encoder", safe_serialization=True)
    clip.save_pretrained(out / "text_encoder_2", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    save_transformer(transformer, out)
    (out / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    (out / "world.json").write_text(json.dumps(world.to_dict(), indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({"recipe": asdict(recipe)}, indent=2) + "\n")

    # Prompts are encoded exactly as every later user encodes them: through the backbone.
    backbone = ToyHunyuanBackbone(_options(out))
    conditions = backbone.encode_prompts(world.all_training_captions())

    def loss_of(clips, caps, gen):
        """Flow-matching loss on a batch: the model's velocity against ``noise - x0``."""
        x0 = clips_to_latents(torch.from_numpy(clips))
        cond = backbone.collate([conditions[c] for c in caps])
        u = torch.rand(x0.size(0), generator=gen)
        sigma = recipe.shift * u / (1 + (recipe.shift - 1) * u)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        pred = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=cond.embeds,
                           encoder_attention_mask=cond.mask, pooled_projections=cond.pooled,
                           return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), noise - x0)

    return fit(transformer, loss_of, world, recipe, out, progress=progress, checkpoint_every=checkpoint_every,
               log_every=log_every, log_file=log_file)


# -- the backbone -------------------------------------------------------------------------------------
def _options(path, dtype="float32"):
    from t2vu_toy.plugin import ToyHunyuanVideoOptions

    return ToyHunyuanVideoOptions(model_path=Path(path), dtype=dtype)


class ToyHunyuanBackbone(HunyuanVideoBackbone):
    """The HunyuanVideo backbone with an identity latent codec: latents are clips in [-1, 1], ``[3, F, H, W]``."""

    name = "toy_hunyuanvideo"

    def __init__(self, options):
        check_toy_folder(Path(options.model_path), BASE_PATH, "t2vu toy build --arch hunyuanvideo")
        super().__init__(options)
        self.vae_scale_spatial = 1
        self.vae_scale_temporal = 1
        self.world = World.from_folder(self.path)

    def video_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) of the world's clips."""
        return self.world.frames, self.world.size, self.world.size

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, 3, F, H, W]`` -> video ``[B, F, 3, H, W]`` in [0, 1] (the identity codec)."""
        return from_latent(latents.float().permute(0, 2, 1, 3, 4))

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video ``[B, F, 3, H, W]`` in [0, 1] -> latents ``[B, 3, F, H, W]``."""
        return clips_to_latents(video.float())


def load_base(path: Optional[Path] = None, dtype: str = "float32") -> ToyHunyuanBackbone:
    """Load a HunyuanVideo toy base folder (default: the shipped one) as a ready backbone."""
    backbone = ToyHunyuanBackbone(_options(path or BASE_PATH, dtype))
    backbone.load("cpu")
    return backbone
