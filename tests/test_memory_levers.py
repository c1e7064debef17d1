"""Training-memory levers on a tiny CogVideoX: gradient checkpointing of every k-th block, fp8 weight storage."""

import pytest
import torch

from t2vu.core import plugins

torch.set_num_threads(1)

SPEC = """\
backbone: {{name: cogvideox, model_path: {model}, dtype: float32, device: cpu{extra}}}
eraser: {{name: adapter, rank: 4}}
concept: {{target: nudity, prompts: [a nude person on a beach]}}
preserved: {{source: list, concepts: [a dog in a park]}}
losses:
  - {{name: negative_guidance, eta: 3.0}}
  - {{name: preservation, weight: 0.5}}
  - {{name: localization, weight: 1.0}}
training: {{steps: 3, batch_size: 1, learning_rate: 1.0e-2, num_frames: 9, height: 32, width: 32, seed: 0,
           gradient_checkpointing: {ckpt}, states: noise}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tiny import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("levers") / "CogVideoX-tiny", layers=4)


def train(tmp_path, folder, name, ckpt="true", extra=""):
    from t2vu.core.engine import train as run
    from t2vu.core.spec import load_spec

    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SPEC.format(model=folder, ckpt=ckpt, extra=extra, out=tmp_path / name))
    return run(load_spec(spec, plugins.get_registry()))


def test_every_kth_block_is_checkpointed_and_the_gradients_do_not_change(folder, monkeypatch):
    import torch.utils.checkpoint as cp

    from t2vu.plugins.adapter_model import Adapter, EraserSet

    backbone = plugins.get_registry().get("backbone", "cogvideox").build({"model_path": str(folder), "dtype": "float32"})
    backbone.load("cpu")
    sites = backbone.sites()
    erasers = EraserSet({s.name: Adapter(s.dim, 4) for s in sites})
    for p in erasers.parameters():
        torch.nn.init.normal_(p, std=0.2)
    erasers.attach(sites)
    x = torch.randn(1, *backbone.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0))
    e = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([400])

    def grads():
        erasers.zero_grad()
        backbone.predict(x, t, e).square().mean().backward()
        return torch.cat([p.grad.flatten() for p in erasers.parameters()])

    plain = grads()
    counted = []
    real = cp.checkpoint
    monkeypatch.setattr(cp, "checkpoint", lambda fn, *a, **k: counted.append(fn) or real(fn, *a, **k))
    backbone.enable_gradient_checkpointing(every=2)
    for _ in range(2):  # the count restarts with each forward: blocks 0 and 2 of 4, every time
        counted.clear()
        assert torch.allclose(grads(), plain, atol=1e-6)
        assert [f.__self__ for f in counted] == [backbone.transformer.transformer_blocks[i] for i in (0, 2)]
    backbone.enable_gradient_checkpointing()
    counted.clear()
    assert torch.allclose(grads(), plain, atol=1e-6) and len(counted) == 4
    erasers.detach()


def test_training_with_checkpointing_every_k_computes_the_same_losses(tmp_path, folder):
    runs = {ckpt: train(tmp_path, folder, f"ckpt-{ckpt}", ckpt=ckpt) for ckpt in ("false", "2", "true")}
    losses = {ckpt: [row["loss"] for row in r.metrics] for ckpt, r in runs.items()}
    assert losses["2"] == pytest.approx(losses["false"], rel=1e-5)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_fp8_weight_storage_keeps_norms_embeddings_and_erasers_out(tmp_path, folder):
    reg = plugins.get_registry().get("backbone", "cogvideox")
    full = reg.build({"model_path": str(folder), "dtype": "float32"})
    fp8 = reg.build({"model_path": str(folder), "dtype": "float32", "storage_dtype": "float8_e4m3fn"})
    full.load("cpu")
    fp8.load("cpu")
    block = fp8.transformer.transformer_blocks[0]
    assert block.attn1.to_q.weight.dtype == torch.float8_e4m3fn and block.ff.net[2].weight.dtype == torch.float8_e4m3fn
    assert block.norm1.linear.weight.dtype == torch.float32  # norms stay in the compute dtype
    assert fp8.transformer.patch_embed.proj.weight.dtype == torch.float32  # so do embeddings
    assert fp8.transformer.time_embedding.linear_1.weight.dtype == torch.float32
    assert fp8.transformer.proj_out.weight.dtype == torch.float32
    x = torch.randn(1, *full.latent_shape(9, 32, 32), generator=torch.Generator().manual_seed(0))
    e = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = full.predict(x, torch.tensor([400]), e), fp8.predict(x, torch.tensor([400]), e)
    assert not torch.equal(a, b)  # the weights were rounded to fp8 ...
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99  # ... and still compute
    result = train(tmp_path, folder, "fp8", extra=", storage_dtype: float8_e4m3fn")
    assert len(result.metrics) == 3 and all(row["loss"] > 0 for row in result.metrics)
    from t2vu.core.eraser_file import read_eraser

    tensors = read_eraser(result.eraser).tensors
    assert all(v.dtype == torch.float32 for v in tensors.values())  # erasers stay fp32
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if ".up." in k)


def test_fp8_storage_without_checkpointing_every_block_is_refused_before_loading(tmp_path, folder):
    """An un-checkpointed block keeps the up-cast weight copies for backward: fp8 would then cost memory."""
    from typer.testing import CliRunner

    from t2vu.core.cli import app

    for ckpt in ("false", "2"):
        spec = tmp_path / f"fp8-{ckpt}.yaml"
        spec.write_text(SPEC.format(model=folder, ckpt=ckpt, extra=", storage_dtype: float8_e4m3fn",
                                    out=tmp_path / f"fp8-{ckpt}"))
        r = CliRunner().invoke(app, ["run", str(spec)])
        assert r.exit_code == 2 and "backbone.storage_dtype" in r.output and "gradient_checkpointing: true" in r.output
        assert not (tmp_path / f"fp8-{ckpt}").exists()
