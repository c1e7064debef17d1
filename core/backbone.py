"""What the engine needs from a backbone (documentation + shared helpers; light).

A backbone plugin's implementation is called as ``Backbone(options)`` and must
provide the methods of :class:`BackboneProtocol`. The engine never looks
inside the transformer: sites, conditioning, scheduler maths and attention
capture all belong to the backbone.
"""

from __future__ import annotations

from typing import Any, ContextManager, Protocol, Sequence


class BackboneProtocol(Protocol):
    name: str
    transformer: Any  # the frozen torch module; erasers hook into it
    config: dict  # the transformer's config (hashed into eraser files)
    forward_calls: int  # transformer forwards so far (the one-pass-per-kind test counts these)

    def load(self, device: Any) -> None:
        """Load the frozen transformer and scheduler (no VAE, no text encoder yet)."""

    def sites(self) -> list:
        """Eraser attachment sites (``t2vu.plugins.adapter_model.Site``): per block, the attention's video
        output (``stream="video"``) and, where the model has one, the text it reads (``stream="text"``)."""

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Any]:
        """Encode each distinct prompt once (``""`` included); then free the text encoder."""

    def concept_token_mask(self, prompt: str, concept: str) -> Any:
        """Bool ``[text_len]``: the prompt's tokens that spell the concept."""

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of one latent video (no batch dimension)."""

    def sample_timesteps(self, n: int, generator: Any) -> Any:
        """``n`` training timesteps."""

    def add_noise(self, x0: Any, noise: Any, t: Any) -> Any:
        """The forward process: ``x_t`` from clean latents and noise."""

    def predict(self, x_t: Any, t: Any, embeds: Any) -> Any:
        """One transformer forward on a batch; returns the prediction (fp32) shaped like ``x_t``."""

    def sampler_timesteps(self, num_steps: int) -> Any:
        """Timesteps of the inference sampler, noisiest first."""

    def sampler_step(self, prediction: Any, t: Any, t_prev: Any, x_t: Any) -> Any:
        """One deterministic sampler step from ``t`` to ``t_prev`` (``None``: the end)."""

    def capture_attention(self, token_masks: Any, layers: Sequence[int] | None) -> ContextManager[dict]:
        """While active, each forward stores video->concept attention per layer:
        ``{block: [B, frames, tokens_per_frame]}`` for batch rows whose mask has any token."""
