"""CogVideoX backbone implementation (torch + diffusers; imported only to run)."""

from __future__ import annotations

from torch import nn

from t2vu.plugins.adapter_model import Site


def transformer_sites(transformer: nn.Module) -> list[Site]:
    """Eraser sites of a CogVideoX transformer: every block's ``attn1`` (video output).

    The width comes from the loaded module (``to_out`` of each attention), never a constant.
    """
    sites = []
    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn1
        dim = attn.to_out[0].out_features
        sites.append(Site(name=f"transformer_blocks.{i}.attn1", module=attn, dim=dim, block=i))
    return sites
