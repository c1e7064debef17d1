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
            value = "./CogVideoX-5b" if name == "model_path" else "null"
            lines.append(f"  {name}: {value}  # (required) {field.description or ''}".rstrip())
        else:
            lines.append(f"  {name}: {json.dumps(field.default)}{desc}")
    return lines


def starter_spec(backbone: Component) -> str:
    body = "\n".join(_backbone_lines(backbone))
    return f"""# t2vu run spec: train an eraser with `t2vu run THIS_FILE`.
# Validate with `t2vu spec validate THIS_FILE`; relative paths resolve against this file's folder.
{body}

eraser:
  name: adapter        # Linear -> GELU -> Linear on each self-attention's video output
  rank: 128

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
  num_frames: 49
  height: 480
  width: 720
  seed: 42
  gradient_checkpointing: true

output:
  dir: runs/nudity
"""
