"""``t2vu spec init``: a commented starter spec for a backbone."""

from __future__ import annotations

import json

from pydantic_core import PydanticUndefined

from t2vu.core.registry import Component


def _backbone_lines(component: Component) -> list[str]:
    lines = ["backbone:", f"  name: {component.name}"]
    for name, field in component.options.model_fields.items():
        desc = f"  # {field.description}" if field.description else ""
        if field.default is PydanticUndefined:
            value = getattr(component.options, "example_path", "./model") if name == "model_path" else "null"
            lines.append(f"  {name}: {value}  # (required) {field.description or ''}".rstrip())
        else:
            lines.append(f"  {name}: {json.dumps(field.default, default=str)}{desc}")
    return lines


def starter_spec(backbone: Component) -> str:
    body = "\n".join(_backbone_lines(backbone))
    d = getattr(backbone.options, "defaults", None)
    video = [f"  {k}: {v}" for k, v in (("num_frames", getattr(d, "num_frames", None)),
                                         ("height", getattr(d, "height", None)), ("width", getattr(d, "width", None)))]
    video = "\n".join(line if not line.endswith("None") else line.replace("None", "null  # (required)")
                      for line in video)
    presets = getattr(backbone.options, "site_presets", {}) or {}
    default_sites = getattr(backbone.options, "default_sites", None)
    sites = (f"\n  # sites: [{default_sites}]  # where erasers attach: {', '.join(presets)} or name patterns"
             if presets else "")
    return f"""# t2vu run spec: train an eraser with `t2vu run THIS_FILE`.
# Validate with `t2vu spec validate THIS_FILE`; relative paths resolve against this file's folder.
{body}

eraser:
  name: adapter        # Linear -> GELU -> Linear adapters on the attention outputs `sites` chooses
  rank: 128{sites}

concept:
  target: nudity       # the concept to erase
  prompts: prompts.txt # a file (one prompt a line, '#' comments) or an inline list

preserved:             # concepts the eraser must leave untouched
  source: list         # file | list | any installed source (`t2vu plugins list --kind concept_source`)
  concepts: [clothing, a person walking, a dog in a park]

losses:
  - {{name: negative_guidance, weight: 1.0, eta: 7.0}}
  - {{name: preservation, weight: 0.5}}
  - {{name: localization, weight: 1.0, threshold: 0.1}}

training:
  steps: 500
  batch_size: 1
  learning_rate: 1.0e-4
{video}
  seed: 42
  gradient_checkpointing: true

output:
  dir: runs/nudity
"""
