"""The toy base model: building, training, saving, loading (``ToyBackbone``) and sampling.

The base is a real diffusers ``CogVideoXTransformer3DModel`` trained in pixel
space: the latent codec is the identity, latents are the clips scaled to
``[-1, 1]``, shaped ``[F, 3, H, W]``. Its folder looks like a CogVideoX model
folder without a ``vae/`` (``transformer/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``model_index.json``) plus ``world.json`` (the vocabulary and
sizes of :class:`~t2vu_toy.world.World`) and ``training.json`` (the recipe).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from t2vu.backbones.cogvideox_model import CogVideoXBackbone
from t2vu.core.errors import T2VUError
from t2vu.core.sampling import generate
from t2vu_toy.world import DEFAULT_WORLD, World, from_latent, to_latent

#: The shipped base model folder (inside the package, so the wheel carries it).
BASE_PATH = Path(__file__).resolve().parent / "base"
SPECIALS = ("<pad>", "</s>", "<unk>")


@dataclass(frozen=True)
class FitRecipe:
    """The optimisation both toy bases share (:func:`fit`)."""

    steps: int = 13000
    seed: int = 0
    batch_size: int = 16
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.998


@dataclass(frozen=True)
class Recipe(FitRecipe):
    """How the shipped base was trained (``t2vu toy build`` defaults)."""

    # transformer
    layers: int = 4
    heads: int = 4
    head_dim: int = 16
    time_embed_dim: int = 64
    patch_size: int = 4
    text_len: int = 8
    # frozen random text encoder
    text_dim: int = 32
    text_layers: int = 2


# -- components -------------------------------------------------------------------
def make_tokenizer(world: World = DEFAULT_WORLD):
    """A T5 (Unigram) tokenizer in which every world word is one token.

    The vocabulary is written directly (no training, hence deterministic):
    each word is a ``▁word`` piece; single letters stay as a low-scoring
    fallback, so unknown words are spelt out instead of becoming ``<unk>``.
    """
    from transformers import T5Tokenizer

    vocab = [(s, 0.0) for s in SPECIALS]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(world.words())]
    vocab += [("\u2581", -8.0)]
    vocab += [(ch, -10.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing", snr_shift_scale=1.0)


def make_text_encoder(vocab_size: int, recipe: Recipe):
    from transformers import T5Config, T5EncoderModel

    encoder = T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=recipe.text_dim, d_kv=recipe.text_dim // 4, d_ff=recipe.text_dim * 2,
        num_layers=recipe.text_layers, num_heads=4, relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return encoder.eval()


def make_transformer(world: World, recipe: Recipe):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(
        num_attention_heads=recipe.heads, attention_head_dim=recipe.head_dim, in_channels=3, out_channels=3,
        time_embed_dim=recipe.time_embed_dim, text_embed_dim=recipe.text_dim, num_layers=recipe.layers,
        sample_width=world.size, sample_height=world.size, sample_frames=world.frames,
        patch_size=recipe.patch_size, temporal_compression_ratio=1, max_text_seq_length=recipe.text_len,
        use_rotary_positional_embeddings=False)


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "CogVideoXToyPipeline",
        "_diffusers_version": diffusers.__version__,
        "_t2vu_note": "pixel-space toy world model, no VAE (latents are clips in [-1, 1]); "
                      "load it with t2vu's `toy` backbone",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": [None, None],
    }


def save_transformer(transformer, path: Path) -> None:
    transformer.save_pretrained(Path(path) / "transformer", safe_serialization=True)


# -- training -------------------------------------------------------------------------
def build_base(out: Path, *, recipe: Recipe = Recipe(), world: World = DEFAULT_WORLD,
               progress: Optional[Callable[[int, int, float], None]] = None,
               checkpoint_every: int = 0, log_every: int = 50, log_file: Optional[Path] = None) -> Path:
    """Build and train the base model into the folder ``out``; deterministic given ``recipe.seed``.

    ``progress(step, total, loss)`` is called after every step. With
    ``checkpoint_every``, EMA weights are also saved to
    ``out/checkpoints/step-NNNNNN/`` (a ``transformer`` folder each).
    """
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(recipe.seed)
    tokenizer = make_tokenizer(world)
    text_encoder = make_text_encoder(len(tokenizer), recipe)
    transformer = make_transformer(world, recipe)
    scheduler = make_scheduler()
    tokenizer.save_pretrained(out / "tokenizer")
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    save_transformer(transformer, out)
    (out / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    (out / "world.json").write_text(json.dumps(world.to_dict(), indent=2) + "\n")
    (out / "training.json").write_text(json.dumps({"recipe": asdict(recipe)}, indent=2) + "\n")

    # Prompts are encoded exactly as every later user encodes them: through the backbone.
    backbone = ToyBackbone(_options(out, "float32"))
    embeds = backbone.encode_prompts(world.all_training_captions())

    abar = scheduler.alphas_cumprod.to(torch.float32)

    def loss_of(clips, caps, gen):
        """v-prediction DDPM loss on a batch."""
        x0 = to_latent(torch.from_numpy(clips))
        emb = torch.stack([embeds[c] for c in caps])
        t = torch.randint(0, abar.numel(), (x0.size(0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = transformer(hidden_states=x_t, encoder_hidden_states=emb, timestep=t, return_dict=False)[0]
        return torch.nn.functional.mse_loss(pred.float(), v)

    return fit(transformer, loss_of, world, recipe, out, progress=progress, checkpoint_every=checkpoint_every,
               log_every=log_every, log_file=log_file)


def fit(transformer, loss_of: Callable, world: World, recipe, out: Path, *,
        progress: Optional[Callable[[int, int, float], None]] = None, checkpoint_every: int = 0,
        log_every: int = 50, log_file: Optional[Path] = None) -> Path:
    """The toy bases' training loop: AdamW with warmup + cosine, gradient clipping, EMA weights (saved to
    ``out/transformer``, and every ``checkpoint_every`` steps to ``out/checkpoints/step-NNNNNN``), the loss
    averaged every ``log_every`` steps into ``training.json``. ``loss_of(clips, captions, generator)`` is the
    architecture's own loss on a batch of :meth:`World.batches`."""
    transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)

    def lr_at(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    batches = world.batches(recipe.seed, recipe.batch_size)
    started, running, log = time.time(), 0.0, []
    for step in range(recipe.steps):
        clips, caps = next(batches)
        loss = loss_of(clips, caps, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), transformer.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if progress is not None:
            progress(step + 1, recipe.steps, loss.item())
        if (step + 1) % log_every == 0:
            entry = {"step": step + 1, "loss": running / log_every, "seconds": round(time.time() - started, 1)}
            log.append(entry)
            running = 0.0
            if log_file is not None:
                with open(log_file, "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < recipe.steps:
            save_transformer(ema, out / "checkpoints" / f"step-{step + 1:06d}")
    save_transformer(ema, out)
    (out / "training.json").write_text(json.dumps(
        {"recipe": asdict(recipe), "seconds": round(time.time() - started, 1), "log": log}, indent=2) + "\n")
    return out


# -- the backbone ---------------------------------------------------------------------
def _options(path, dtype="float32"):
    from t2vu_toy.plugin import ToyOptions

    return ToyOptions(model_path=Path(path), dtype=dtype)


def check_toy_folder(path: Path, base: Path = BASE_PATH, build: str = "t2vu toy build") -> None:
    """Fail with an actionable message before anything heavy loads (``base``: the shipped folder of this
    architecture, ``build``: the command that makes one)."""
    path = Path(path)
    if not (path / "world.json").exists() and path.resolve() == base:
        raise T2VUError(f"the shipped toy base model is missing from {path}; rebuild it with `{build} --out {path}`")
    if not path.exists():
        raise T2VUError(f"backbone.model_path: {path} does not exist; make a toy model with `{build} --out {path}` "
                        "(or leave model_path out for the shipped base)")
    if path.is_dir() and not (path / "world.json").exists():
        raise T2VUError(f"backbone.model_path: {path} is not a toy-world model folder (no world.json); "
                        f"make one with `{build} --out DIR`")


class ToyBackbone(CogVideoXBackbone):
    """The CogVideoX backbone with an identity latent codec: latents are clips in [-1, 1], ``[F, 3, H, W]``."""

    name = "toy"

    def __init__(self, options):
        check_toy_folder(Path(options.model_path))
        super().__init__(options)
        self.vae_scale_spatial = 1
        self.vae_scale_temporal = 1
        self.world = World.from_folder(self.path)

    def video_shape(self) -> tuple[int, int, int]:
        """(frames, height, width) of the world's clips."""
        return self.world.frames, self.world.size, self.world.size

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[..., F, 3, H, W]`` -> video in [0, 1] (the identity codec)."""
        return from_latent(latents.float())

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video in [0, 1] -> latents in [-1, 1]."""
        return to_latent(video.float())


def load_base(path: Optional[Path] = None, dtype: str = "float32") -> ToyBackbone:
    """Load a toy base folder (default: the shipped one) as a ready backbone."""
    backbone = ToyBackbone(_options(path or BASE_PATH, dtype))
    backbone.load("cpu")
    return backbone


# -- sampling -------------------------------------------------------------------------
def sample(backbone, prompts: Sequence[str], seeds: Sequence[int], steps: int = 25, guidance: float = 5.0,
           batch_size: int = 16, embeds: Optional[dict] = None) -> torch.Tensor:
    """DDIM with classifier-free guidance: videos ``[B, F, 3, H, W]`` in [0, 1].

    Sample ``i`` starts from noise seeded with ``seeds[i]`` (``t2vu.core.sampling``, the
    sampler ``t2vu eval`` uses), so the result is deterministic given the seeds. ``embeds``
    may hold precomputed prompt embeddings (``""`` included); otherwise they are encoded here.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    frames, height, width = _video_shape(backbone)
    if embeds is None or any(p not in embeds for p in [*prompts, ""]):
        embeds = backbone.encode_prompts(list(dict.fromkeys([*prompts, ""])))
    return generate(backbone, embeds, list(prompts), list(seeds), num_frames=frames, height=height, width=width,
                    steps=steps, guidance=guidance, batch_size=batch_size)


def _video_shape(backbone) -> tuple[int, int, int]:
    if hasattr(backbone, "video_shape"):
        return backbone.video_shape()
    c = backbone.config
    return int(c["sample_frames"]), int(c["sample_height"]), int(c["sample_width"])
