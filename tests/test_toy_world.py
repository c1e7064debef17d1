"""The toy world: rendering, judges, determinism, `t2vu toy build`, the shipped base model."""

import itertools

import numpy as np
import pytest
import torch

from t2vu.core import plugins
from t2vu_toy import judges as J
from t2vu_toy.world import DEFAULT_WORLD as W
from t2vu_toy.world import World, shape_mask

torch.set_num_threads(1)
torch.set_flush_denormal(True)


def blur(video, sigma=0.8):
    k = np.exp(-0.5 * (np.arange(-2, 3) / sigma) ** 2)
    k /= k.sum()
    out = video
    for axis in (2, 3):
        out = sum(k[i] * np.roll(out, i - 2, axis=axis) for i in range(5))
    return out.astype(np.float32)


def noisy(video, rng, std=0.1):
    return np.clip(video + rng.normal(0, std, video.shape), 0, 1).astype(np.float32)


# -- the world ------------------------------------------------------------------------
def test_vocabulary_and_split():
    assert len(W.colors) >= 6 and {"red", "orange", "magenta"} <= set(W.colors)
    assert len(W.shapes) == 3 and len(W.directions) == 4
    assert {"crimson", "scarlet"} <= set(W.synonyms["red"])
    held, train = W.held_out(), W.train_combinations()
    assert len(held) == 12 and len(train) == 60 and not set(held) & set(train)
    # every pair of attributes of a held-out triple is still seen in training
    for c, s, d in held:
        assert any(x[:2] == (c, s) for x in train)
        assert any((x[0], x[2]) == (c, d) for x in train)
        assert any(x[1:] == (s, d) for x in train)
    # no training caption names a held-out triple, with any colour word
    caps = set(W.all_training_captions())
    for c, s, d in held:
        for w in W.color_words(c):
            assert W.caption(w, s, d) not in caps
    assert "" in caps and "red" in caps and "crimson" in caps


@pytest.mark.parametrize("shape", W.shapes)
def test_render_every_class(shape):
    for color, direction in itertools.product(W.colors, W.directions):
        clip = W.render(color, shape, direction)
        assert clip.shape == (W.frames, 3, W.size, W.size) and clip.dtype == np.float32
        assert 0 <= clip.min() and clip.max() <= 1
        # the object's pure pixels carry the colour, the corners the background
        rgb = np.asarray(W.colors[color])
        alpha = np.abs(clip - np.asarray(W.background)[None, :, None, None]).sum(1)
        core = clip.transpose(0, 2, 3, 1)[alpha >= alpha.max() - 1e-6]
        assert np.allclose(core, rgb, atol=1e-5)
        assert np.allclose(clip[:, :, 0, 0], W.background)
        # it moves `speed` px per frame in its direction
        ys, xs = np.mgrid[0:W.size, 0:W.size]
        cx = [(a * xs).sum() / a.sum() for a in alpha]
        cy = [(a * ys).sum() / a.sum() for a in alpha]
        dx, dy = W.directions[direction]
        assert np.allclose(np.diff(cx), dx * W.speed, atol=1e-4)
        assert np.allclose(np.diff(cy), dy * W.speed, atol=1e-4)
    area = shape_mask(shape, W.shape_size).mean()
    assert {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape] == pytest.approx(area, abs=0.02)


def test_world_is_deterministic_and_round_trips():
    a, b = W.batches(3, 4), W.batches(3, 4)
    for _ in range(3):
        (ca, pa), (cb, pb) = next(a), next(b)
        assert np.array_equal(ca, cb) and pa == pb
    assert not np.array_equal(next(W.batches(4, 4))[0], next(W.batches(3, 4))[0])
    assert World.from_dict(W.to_dict()) == W
    with pytest.raises(ValueError):
        W.render("red", "circle", "left", x=0)  # no room to move left


# -- judges ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["clean", "noise", "blur", "noise+blur"])
def test_judges_on_renders_of_every_class(mode):
    rng = np.random.default_rng(7)
    wrong = []
    for c, s, d in W.combinations():
        for _ in range(2):
            clip = W.random_clip(rng, c, s, d)
            if "blur" in mode:
                clip = blur(clip)
            if "noise" in mode:
                clip = noisy(clip, rng, 0.1)
            got = J.judge_all(torch.from_numpy(clip))
            if (got["color"], got["shape"], got["motion"]) != (c, s, d):
                wrong.append(((c, s, d), got))
    assert not wrong, wrong[:5]


def test_judges_are_robust_to_heavier_noise():
    rng = np.random.default_rng(11)
    hits, n = {"color": 0, "shape": 0, "motion": 0}, 0
    for c, s, d in W.combinations():
        clip = noisy(blur(W.random_clip(rng, c, s, d), 1.0), rng, 0.15)
        got = J.judge_all(clip)
        n += 1
        hits["color"] += got["color"] == c
        hits["shape"] += got["shape"] == s
        hits["motion"] += got["motion"] == d
    assert hits["color"] == n and hits["motion"] == n and hits["shape"] >= 0.95 * n, hits


def clip_of(alpha: np.ndarray, color: str = "green", step: tuple = (0, 0)) -> np.ndarray:
    """A clip of the 2-D coverage ``alpha`` (placed at the canvas's top-left + 5 px) moving by ``step`` per frame."""
    a = np.zeros((W.frames, W.size, W.size), np.float32)
    h, w = alpha.shape
    for f in range(W.frames):
        y, x = 5 + step[0] * f, 5 + step[1] * f
        a[f, y:y + h, x:x + w] = alpha
    bg = np.asarray(W.background, np.float32)[None, :, None, None]
    fg = np.asarray(W.colors[color], np.float32)[None, :, None, None]
    return bg + a[:, None] * (fg - bg)


def rounded_square(size: int, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cy, cx = np.clip(yy, radius, size - radius), np.clip(xx, radius, size - radius)
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2).astype(np.float32)


@pytest.mark.parametrize("radius, expected", [(0.0, "square"), (0.1, "square"), (0.2, "square"),
                                              (0.42, "circle"), (0.5, "circle")])
def test_shape_judge_rounded_corners(radius, expected):
    """A square with a corner radius up to a fifth of its side is a square; near a half, a circle."""
    for size in (12, 18, 22):
        assert J.ShapeJudge()(clip_of(rounded_square(size, radius * size))) == expected, size


@pytest.mark.parametrize("shape", W.shapes)
def test_shape_judge_sees_past_the_flaws_of_a_models_samples(shape):
    """What the base's samples look like: a stray column attached to the object, frayed edges, other sizes.
    Bounding-box features fail here (a stray column made rough squares look like circles)."""
    judge = J.ShapeJudge()
    rng = np.random.default_rng(3)
    for size in (11, 15, 18, 22):
        m = shape_mask(shape, size)
        assert judge(noisy(clip_of(m, step=(1, 1)), rng, 0.05)) == shape, ("size", size)
    m = np.pad(shape_mask(shape, 18), ((0, 0), (0, 3)))
    rows = slice(4, 14) if shape != "triangle" else slice(12, 18)
    m[rows, 19] = 1.0  # a one-pixel column beside the object, joined to it by one row
    m[rows.start, 18] = 1.0
    assert judge(clip_of(m)) == shape, "stray column"
    for seed in range(5):
        r = np.random.default_rng(seed)
        m = (shape_mask(shape, 18) > 0.5).astype(np.float32)
        edge = (m > 0) & ~(np.pad(m, 1)[2:, 1:-1] * np.pad(m, 1)[:-2, 1:-1]
                          * np.pad(m, 1)[1:-1, 2:] * np.pad(m, 1)[1:-1, :-2] > 0)
        m[edge & (r.random(m.shape) < 0.3)] = 0.0  # chip 30% of the outline
        assert judge(clip_of(m)) == shape, ("frayed", seed)


def test_judges_api_and_nothing_to_judge():
    reg = plugins.get_registry()
    for name, attr in (("toy_color", "color"), ("toy_shape", "shape"), ("toy_motion", "motion")):
        judge = reg.get("evaluator", name).build({})
        assert judge.attribute == attr and "none" in judge.labels
        assert set(judge.labels) - {"none"} == set({"color": W.colors, "shape": W.shapes,
                                                    "motion": W.directions}[attr])
        blank = torch.full((W.frames, 3, W.size, W.size), 0.08)
        assert judge(blank) == "none"
        assert judge(blank + 0.02 * torch.randn(blank.shape, generator=torch.Generator().manual_seed(0))) == "none"
    gray = W.render("red", "square", "left")
    gray[:] = gray.mean(1, keepdims=True)  # an object without colour
    assert J.ColorJudge()(gray) == "none" and J.ShapeJudge()(gray) == "square"
    still = np.repeat(W.render("blue", "circle", "up")[:1], W.frames, axis=0)
    assert J.MotionJudge()(still) == "none"
    with pytest.raises(ValueError):
        J.ColorJudge()(np.zeros((4, 32, 32)))


# -- building the base ------------------------------------------------------------------
def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def _toy_cli():
    """A Typer app with the toy plugin's `toy` command group, as `t2vu` adds it."""
    import typer

    from t2vu_toy import plugin

    cli = typer.Typer()

    @cli.callback()
    def _root():
        pass

    plugin.register_commands(cli)
    return cli


def test_toy_build_is_deterministic(tmp_path):
    from typer.testing import CliRunner

    cli = _toy_cli()
    runner = CliRunner()
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        r = runner.invoke(cli, ["toy", "build", "--out", str(tmp_path / name), "--steps", "3",
                                "--seed", str(seed)])
        assert r.exit_code == 0, r.output
        outs.append(_weights(tmp_path / name))
    a, b, c = outs
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    for sub in ("world.json", "model_index.json", "tokenizer", "text_encoder", "scheduler"):
        assert (tmp_path / "a" / sub).exists()


# -- the shipped base ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    plugins.reset()
    backbone = plugins.get_registry().get("backbone", "toy").build({})
    backbone.load("cpu")
    return backbone


def test_toy_backbone_folder_errors(tmp_path):
    from t2vu.core.errors import T2VUError

    comp = plugins.get_registry().get("backbone", "toy")
    with pytest.raises(T2VUError, match="t2vu toy build"):
        comp.build({"model_path": str(tmp_path / "nope")})
    with pytest.raises(T2VUError, match="not a toy-world model folder"):
        comp.build({"model_path": str(tmp_path)})


def test_shipped_base_loads_through_the_toy_backbone(base):
    from t2vu_toy.model import BASE_PATH, sample

    assert base.path == BASE_PATH and base.world == W
    assert base.latent_shape(4, 32, 32) == (4, 3, 32, 32)
    assert len([s for s in base.sites() if s.stream == "video"]) == base.config["num_layers"]
    emb = base.encode_prompts(["a red circle moving left", ""])
    assert emb[""].shape == (base.config["max_text_seq_length"], base.config["text_embed_dim"])
    video = sample(base, ["a red circle moving left", "a blue square moving up"], [0, 1], steps=4)
    assert video.shape == (2, 4, 3, 32, 32) and 0 <= video.min() and video.max() <= 1
    again = sample(base, ["a red circle moving left"], [0], steps=4)
    assert torch.allclose(video[:1], again, atol=1e-5)


@pytest.fixture(scope="module")
def held_out_accuracy(base):
    """Two fixed seeds for each of the 12 held-out triples (24 clips; DDIM 25 steps, CFG 5).

    The full benchmark (benchmarks/toy_base.py, 8 seeds each) is the reference;
    this is its small, deterministic slice (same seeds, same clips every run).
    """
    from t2vu_toy.model import sample

    prompts, truths, seeds = [], [], []
    for (prompt, truth), seed in itertools.product(W.held_out_prompts(), (1000, 1001)):
        prompts.append(prompt)
        truths.append(truth)
        seeds.append(seed)
    return J.accuracy(sample(base, prompts, seeds), truths)


def test_shipped_base_draws_held_out_combinations(held_out_accuracy):
    """The issue's targets for the base, on held-out (colour, shape, direction) triples."""
    acc = held_out_accuracy
    assert acc["color"] >= 0.95 and acc["motion"] >= 0.90 and acc["shape"] >= 0.80, acc


# -- the HunyuanVideo-architecture toy ----------------------------------------------------------
def test_hunyuanvideo_toy_builds_deterministically_and_trains_an_eraser(tmp_path):
    """`t2vu toy build --arch hunyuanvideo` is deterministic (same seed, same weights; a HunyuanVideoPipeline folder
    without a VAE); the `toy_hunyuanvideo` backbone loads it through the hunyuanvideo backbone, draws clips of the
    world, and `t2vu run` trains an eraser in it with all three losses."""
    import json

    from typer.testing import CliRunner

    from t2vu.core.cli import app

    cli = _toy_cli()
    runner = CliRunner()
    outs = []
    for name, seed in (("a", 5), ("b", 5)):
        r = runner.invoke(cli, ["toy", "build", "--arch", "hunyuanvideo", "--out", str(tmp_path / name),
                                "--steps", "2", "--seed", str(seed)])
        assert r.exit_code == 0, r.output
        outs.append(_weights(tmp_path / name))
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    index = json.loads((tmp_path / "a" / "model_index.json").read_text())
    assert index["_class_name"] == "HunyuanVideoPipeline" and index["vae"] == [None, None]

    backbone = plugins.get_registry().get("backbone", "toy_hunyuanvideo").build({"model_path": str(tmp_path / "a")})
    backbone.load("cpu")
    assert backbone.latent_shape(4, 32, 32) == (3, 4, 32, 32)
    from t2vu_toy.model import sample

    video = sample(backbone, ["a red circle moving left"], [0], steps=2)
    assert video.shape == (1, 4, 3, 32, 32) and 0 <= float(video.min()) <= float(video.max()) <= 1
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""\
backbone: {{name: toy_hunyuanvideo, model_path: {tmp_path / 'a'}}}
eraser: {{name: adapter, rank: 4, sites: [all]}}
concept: {{target: red, prompts: [a red circle moving left, a red square moving up]}}
preserved: {{source: toy_siblings}}
losses:
  - {{name: negative_guidance, eta: 2.0}}
  - {{name: preservation, weight: 1.0}}
  - {{name: localization, weight: 0.5}}
training: {{steps: 2, batch_size: 2, learning_rate: 1.0e-2, states: erased_trajectory, sample_steps: 3}}
output: {{dir: {tmp_path / 'run'}}}
""")
    r = runner.invoke(app, ["run", str(spec)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "eraser.safetensors").is_file()


def test_shipped_hunyuanvideo_base_loads_and_draws_colours():
    """The shipped HunyuanVideo-architecture base loads by default through `toy_hunyuanvideo` and draws the asked
    colour on held-out triples (its measured colour accuracy is 1.000; shape and motion miss their targets, see
    docs/toy-world.md)."""
    from t2vu_toy.hunyuan import BASE_PATH
    from t2vu_toy.judges import accuracy
    from t2vu_toy.model import sample

    backbone = plugins.get_registry().get("backbone", "toy_hunyuanvideo").build({})
    assert backbone.path == BASE_PATH
    backbone.load("cpu")
    combos = backbone.world.held_out()[:6]
    videos = sample(backbone, [backbone.world.caption(*c) for c in combos], list(range(len(combos))), steps=10)
    assert accuracy(videos, combos, backbone.world)["color"] >= 5 / 6
