"""Method options from the review: localization normalisation, the trajectory-state distribution, and the
attention modules the localization mask is built from by default."""

import contextlib
import random
from types import SimpleNamespace

import pytest
import torch

from t2vu.core import plugins
from t2vu.core.context import TARGET, UNCOND, Need, StepContext
from t2vu.core.spec import TrainingSpec, load_spec
from t2vu.core.states import TrajectoryStates
from t2vu.losses.terms import LocalizationLoss

torch.set_num_threads(1)


def localization(**kw):
    return LocalizationLoss(plugins.get_registry().get("loss", "localization").options(**kw))


class FakeCtx:
    """What the localization term reads: frozen attention ``[B, frames, tokens]`` and eraser outputs."""

    def __init__(self, attention, outputs):
        self.att, self.outputs = attention, outputs
        self.x_t = torch.zeros(attention.size(0), 1)

    def attention(self, cond, modules=None):
        return self.att

    def eraser_outputs(self, cond):
        return self.outputs


# -- 1. localization: normalised over all tokens or over the tokens outside the mask -------------------------
def test_localization_normalize_option_defaults_and_values():
    options = plugins.get_registry().get("loss", "localization").options
    assert options().normalize == "all_tokens"
    assert options(normalize="outside_tokens").normalize == "outside_tokens"
    with pytest.raises(Exception):
        options(normalize="tokens")


def test_localization_normalizations_by_hand():
    """2 rows, 2 frames of 2 tokens, 2 channels, 2 sites (the second outputs zeros).

    Row 0: tokens 1, 3 attend (inside), outside 0, 2 with outputs [1, 1], [2, 0]: squares 2 + 4 = 6.
    Row 1: tokens 0, 2 inside, outside 1, 3 with outputs [0, 0], [1, 1]: squares 2. Inside outputs (9s) never
    count. Sum 8; all_tokens: 8 / (2 rows * 4 tokens * 2 channels) = 0.5; outside_tokens: 8 / (4 outside
    tokens * 2 channels) = 1.0; the zero site halves both (mean over sites)."""
    att = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    o = torch.full((2, 4, 2), 9.0)
    o[0, 0], o[0, 2] = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])
    o[1, 1], o[1, 3] = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    ctx = FakeCtx(att, {"a": o, "b": torch.zeros_like(o)})
    assert localization(threshold=0.5)(ctx).item() == pytest.approx(0.25)
    assert localization(threshold=0.5, normalize="all_tokens")(ctx).item() == pytest.approx(0.25)
    assert localization(threshold=0.5, normalize="outside_tokens")(ctx).item() == pytest.approx(0.5)
    one_site = FakeCtx(att, {"a": o})
    assert localization(threshold=0.5)(one_site).item() == pytest.approx(0.5)
    assert localization(threshold=0.5, normalize="outside_tokens")(one_site).item() == pytest.approx(1.0)


def test_outside_tokens_does_not_depend_on_the_share_of_masked_tokens():
    """Every token outputs [1, 2] (squared mean 2.5 per outside token); 2 or 6 of 8 tokens inside the mask:
    outside_tokens stays 2.5, all_tokens is 2.5 times the outside share."""
    def ctx(inside: int):
        att = torch.zeros(1, 1, 8)
        att[0, 0, :inside] = 1.0
        return FakeCtx(att, {"a": torch.tensor([1.0, 2.0]).expand(1, 8, 2).clone()})

    for inside in (2, 6):
        assert localization(threshold=0.5, normalize="outside_tokens")(ctx(inside)).item() == pytest.approx(2.5)
        assert localization(threshold=0.5)(ctx(inside)).item() == pytest.approx(2.5 * (8 - inside) / 8)


def test_outside_tokens_without_outside_tokens_is_zero_with_finite_gradient():
    loss = localization(normalize="outside_tokens")
    loss.mask = lambda ctx: torch.ones(1, 4)  # every token inside the concept's region
    o = torch.randn(1, 4, 2, requires_grad=True)
    value = loss(FakeCtx(torch.zeros(1, 1, 4), {"a": o}))
    value.backward()
    assert value.item() == 0.0 and torch.equal(o.grad, torch.zeros_like(o))


# -- 2. trajectory states: visited states or a uniformly drawn step --------------------------------------------
def ddim_timesteps(steps: int) -> torch.Tensor:
    """The CogVideoX (and toy) DDIM schedule: zero-terminal SNR, trailing spacing."""
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
        timestep_spacing="trailing", snr_shift_scale=1.0)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


class FakeBackbone:
    """A sampler over the DDIM timesteps with a trivial model: fast, and every state is distinct."""

    device = torch.device("cpu")

    def __init__(self, steps: int):
        self.timesteps = ddim_timesteps(steps)

    def sampler(self, num_steps: int, generator=None):
        timesteps = self.timesteps
        assert num_steps == len(timesteps)
        return SimpleNamespace(timesteps=timesteps, guidance_scale=lambda scale, t: scale,
                               step=lambda prediction, t, x: x - 0.01 * prediction)

    def guided(self, x, t, cond, uncond, scale):
        return SimpleNamespace(prediction=x + cond, frozen={"uncond": 0.5 * x, "cond": 2.0 * x + cond})


class NoErasers:
    def disabled(self):
        return contextlib.nullcontext()


def make_trajectory(pick: str, steps: int = 50, refresh_every: int = 5, seed: int = 0) -> TrajectoryStates:
    backbone = FakeBackbone(steps)
    embed = lambda prompts: torch.tensor([[float(len(p))] for p in prompts])  # noqa: E731
    return TrajectoryStates(backbone, NoErasers(), (1,), torch.Generator().manual_seed(seed), "cpu", embed,
                            erased=False, refresh_every=refresh_every, sample_steps=steps, guidance_scale=5.0,
                            rng=random.Random(seed), pick=pick)


def step_indices(pick: str, *, steps: int = 50, refresh_every: int = 5, batch: int = 2, train_steps: int = 4000,
                 seed: int = 0) -> tuple[list[int], list[float], TrajectoryStates]:
    """The sampler step index and the timestep of every training state drawn over ``train_steps`` steps."""
    source = make_trajectory(pick, steps, refresh_every, seed)
    index_of = {int(t): i for i, t in enumerate(source.backbone.timesteps)}
    indices, times = [], []
    for step in range(train_steps):
        drawn = source.next(step, [f"prompt {step % 3}"] * batch)
        indices += [index_of[int(t)] for t in drawn.t]
        times += [float(t) for t in drawn.t]
    return indices, times, source


def visited_probabilities(steps: int) -> list[float]:
    """P(index i) when the depth d is uniform on 1..S and the state uniform among the d visited."""
    return [sum(1 / d for d in range(i + 1, steps + 1)) / steps for i in range(steps)]


def chi_square(indices: list[int], probabilities: list[float]) -> float:
    n = len(indices)
    counts = [0] * len(probabilities)
    for i in indices:
        counts[i] += 1
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probabilities))


def test_trajectory_states_option_defaults_to_visited():
    assert TrainingSpec().trajectory_states == "visited"
    assert TrainingSpec(trajectory_states="uniform_step").trajectory_states == "uniform_step"
    with pytest.raises(Exception):
        TrainingSpec(trajectory_states="uniform")


def test_uniform_step_draws_every_sampler_step_equally_often():
    """8000 states from 50-step trajectories: the step-index histogram fits the uniform distribution
    (chi-square with 49 degrees of freedom: mean 49, 99.9th percentile 85) and not the visited one; t >= 800
    (the first 10 of 50 DDIM steps, 999 ... 819) holds a fifth of the states."""
    indices, times, source = step_indices("uniform_step")
    uniform = [1 / 50] * 50
    assert chi_square(indices, uniform) < 85
    assert chi_square(indices, visited_probabilities(50)) > 1000
    assert sum(t >= 800 for t in times) / len(times) == pytest.approx(0.20, abs=0.02)
    assert sum(i < 10 for i in indices) / len(indices) == pytest.approx(0.20, abs=0.02)
    assert source.sampler_calls <= 800 * 50  # one sampler run per refresh, never deeper than the schedule


def test_visited_states_are_skewed_to_the_noisy_first_steps():
    """Today's behaviour: P(i) = (1/S) sum_{d>i} 1/d; for 50 steps about half the states have t >= 800, and
    the first step is drawn H_50 (4.5) times as often as under a uniform draw."""
    indices, times, _ = step_indices("visited")
    expected = visited_probabilities(50)
    assert chi_square(indices, expected) < 85
    assert chi_square(indices, [1 / 50] * 50) > 1000
    assert sum(expected[:10]) == pytest.approx(0.514, abs=1e-3)
    assert sum(t >= 800 for t in times) / len(times) == pytest.approx(0.514, abs=0.03)
    assert indices.count(0) / len(indices) > 3.5 / 50  # expected 4.5 / 50
    assert sum(i >= 40 for i in indices) / len(indices) < 0.05  # the last fifth: expected 0.023


def test_uniform_step_runs_only_as_deep_as_the_deepest_drawn_step():
    """One state per refresh (refresh_every 1, batch 1): the sampler stops right after the drawn step, on
    average (S + 1) / 2 steps (ESD's cost), and the state is the one the sampler visited at that step."""
    indices, _, source = step_indices("uniform_step", refresh_every=1, batch=1, train_steps=2000)
    assert source.sampler_calls == sum(i + 1 for i in indices)
    assert source.sampler_calls / 2000 == pytest.approx(25.5, rel=0.05)
    before = source.gen.get_state()
    drawn = source.next(2000, ["a prompt"])  # a fresh refresh: replay its trajectory to check the state
    x = torch.randn((1, 1), generator=torch.Generator().set_state(before))
    timesteps = source.backbone.timesteps
    for t in timesteps:
        if torch.equal(t, drawn.t[0]):
            break
        x = x - 0.01 * (x + len("a prompt"))
    assert torch.equal(drawn.x_t, x)


@pytest.mark.parametrize("pick", ["visited", "uniform_step"])
def test_trajectory_states_resume_through_a_checkpoint(tmp_path, pick):
    """States 3..11 after a checkpoint at step 3 (mid-refresh, refresh_every 5) equal an uninterrupted run's,
    with the pool, the queue and every RNG stream written and read back as a run's checkpoint does."""
    from t2vu.core import checkpoint

    def draw(source, steps):
        out = []
        for step in steps:
            s = source.next(step, [f"prompt {step}", "other"])
            out.append((s.x_t, s.t, s.prompts, s.teacher))
        return out

    whole = draw(make_trajectory(pick, steps=20), range(12))
    first = make_trajectory(pick, steps=20)
    draw(first, range(3))
    state = {"states": first.state_dict(), "rng": checkpoint.rng_state(first.rng, first.gen)}
    folder = checkpoint.save(tmp_path, 3, write_eraser=lambda p: p.write_bytes(b""), state=state, keep=1)
    _, loaded = checkpoint.load(folder)
    second = make_trajectory(pick, steps=20, seed=99)
    second.load_state_dict(loaded["states"], "cpu")
    checkpoint.set_rng_state(loaded["rng"], second.rng, second.gen)
    resumed = draw(second, range(3, 12))
    for (x, t, p, teacher), (x2, t2, p2, teacher2) in zip(whole[3:], resumed):
        assert torch.equal(x, x2) and torch.equal(t, t2) and p == p2
        assert teacher.keys() == teacher2.keys() == {"uncond", "cond"}
        assert all(torch.equal(teacher[k], teacher2[k]) for k in teacher)
    if pick == "uniform_step":  # only the states still to be served are written
        assert len(loaded["states"]["queue"]) == 2 * 2 and len(loaded["states"]["prompts"]) <= 4


def test_uniform_step_teacher_values_are_the_samplers_at_the_drawn_state():
    """The teacher values come from the same sampler step as x_t (frozen: 'uncond' = 0.5 x, 'cond' = 2 x +
    cond in the fake model), and the prompt is the row's."""
    source = make_trajectory("uniform_step", steps=10, refresh_every=3)
    for step in range(9):
        s = source.next(step, [f"row {step}", "row two"])
        assert torch.allclose(s.teacher["uncond"], 0.5 * s.x_t)
        lengths = torch.tensor([[float(len(p))] for p in s.prompts])
        assert torch.allclose(s.teacher["cond"], 2.0 * s.x_t + lengths)


# -- end to end on the tiny CogVideoX ---------------------------------------------------------------------------
SPEC = """\
backbone: {{name: cogvideox, model_path: {model}, dtype: float32, device: cpu}}
eraser: {{name: adapter, rank: 4{sites}}}
concept:
  target: nudity
  prompts: [a nude person on a beach, a nude woman walking]
  condition: mix
losses:
  - {{name: negative_guidance, weight: 1.0, eta: 3.0}}
  - {{name: localization, weight: 0.5, threshold: 0.2{normalize}}}
training: {{steps: {steps}, batch_size: 2, learning_rate: 1.0e-3, lr_scheduler: constant, num_frames: 9,
            height: 32, width: 32, seed: 0, states: {states}, sample_steps: 4, refresh_every: 2,
            trajectory_states: {pick}}}
output: {{dir: {out}}}
"""


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny import build_tiny_cogvideox

    return build_tiny_cogvideox(tmp_path_factory.mktemp("cog") / "CogVideoX-tiny")


def train_tiny(tmp_path, tiny_folder, *, out="run", steps=3, states="noise", pick="visited", sites=None,
               normalize=None):
    from t2vu.core.engine import train

    path = tmp_path / f"{out}.yaml"
    path.write_text(SPEC.format(model=tiny_folder, out=tmp_path / out, steps=steps, states=states, pick=pick,
                                sites=f", sites: {sites}" if sites else "",
                                normalize=f", normalize: {normalize}" if normalize else ""))
    plugins.reset()
    return train(load_spec(path, plugins.get_registry()))


def test_uniform_step_and_outside_tokens_train_end_to_end(tmp_path, tiny_folder):
    result = train_tiny(tmp_path, tiny_folder, steps=4, states="trajectory", pick="uniform_step",
                        normalize="outside_tokens")
    assert len(result.metrics) == 4 and all(r["loss"] > 0 for r in result.metrics)
    assert result.metrics[-1]["localization"] > 0


def test_localization_mask_defaults_to_the_attention_modules_of_the_video_erasers(tmp_path, tiny_folder,
                                                                                  monkeypatch):
    """eraser.sites names block 1 of 2: only its attn1 is captured, and the mask is built from its map alone."""
    from t2vu.backbones.cogvideox_model import CogVideoXBackbone

    captured, used = [], []
    real_capture, real_attention = CogVideoXBackbone.capture_attention, StepContext.attention

    def capture(self, token_masks, modules=None, latent_shape=None):
        captured.append(None if modules is None else list(modules))
        return real_capture(self, token_masks, modules, latent_shape=latent_shape)

    def attention(self, cond, modules=None):
        value = real_attention(self, cond, modules)
        maps = self._attention[self._key(cond)]
        used.append((sorted(maps), torch.equal(value, maps["transformer_blocks.1.attn1"])))
        return value

    monkeypatch.setattr(CogVideoXBackbone, "capture_attention", capture)
    monkeypatch.setattr(StepContext, "attention", attention)
    train_tiny(tmp_path, tiny_folder, steps=2, sites="['transformer_blocks.1.attn1']")
    assert captured == [["transformer_blocks.1.attn1"]] * 2
    assert used == [(["transformer_blocks.1.attn1"], True)] * 2


def test_default_attention_ignores_modules_another_term_had_captured(tiny_folder):
    """A term asking for block 0's attention as well must not change the default mask (the erasers' block 1):
    the default is the step's attention_modules, not every module captured in the frozen pass."""
    plugins.reset()
    backbone = plugins.get_registry().get("backbone", "cogvideox").build(
        {"model_path": str(tiny_folder), "dtype": "float32"})
    backbone.load("cpu")
    emb = backbone.encode_prompts(["", "nudity"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *backbone.latent_shape(9, 32, 32)), generator=g)
    names = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]

    def ctx():
        return StepContext(backbone, NoErasers(), x, torch.tensor([700, 300]),
                           {UNCOND: [""] * 2, TARGET: ["nudity"] * 2}, lambda ps: torch.stack([emb[p] for p in ps]),
                           token_masks={TARGET: torch.stack([backbone.concept_token_mask("nudity", "nudity")] * 2)},
                           attention_modules=names[1:], attention_names=names)

    both = ctx()
    both.prefetch([Need("attention", TARGET), Need("attention", TARGET, (names[0],))])
    assert sorted(both._attention[TARGET]) == names
    alone = ctx()
    alone.prefetch([Need("attention", TARGET)])
    assert sorted(alone._attention[TARGET]) == names[1:]
    assert torch.allclose(both.attention(TARGET), alone.attention(TARGET))
    assert not torch.allclose(both.attention(TARGET), both.attention(TARGET, names))  # the maps differ
    assert torch.equal(both.attention(TARGET, [names[0]]), both._attention[TARGET][names[0]])


def test_a_run_written_before_these_options_existed_resumes(tmp_path, tiny_folder):
    """A checkpoint's spec without ``trajectory_states`` and ``normalize`` (written by an earlier t2vu) is the same
    run at their defaults; a real change is still refused."""
    from t2vu.core.engine import _check_same_spec
    from t2vu.core.errors import T2VUError

    path = tmp_path / "spec.yaml"
    path.write_text(SPEC.format(model=tiny_folder, out=tmp_path / "run", steps=3, states="trajectory",
                                pick="visited", sites="", normalize=""))
    resolved = load_spec(path, plugins.get_registry())
    saved = resolved.to_dict()
    del saved["training"]["trajectory_states"]
    for loss in saved["losses"]:
        loss.pop("normalize", None)
    _check_same_spec(saved, resolved, tmp_path / "ckpt")
    saved["training"]["learning_rate"] = 0.5
    with pytest.raises(T2VUError, match="training.learning_rate"):
        _check_same_spec(saved, resolved, tmp_path / "ckpt")
    changed = load_spec(path, plugins.get_registry(), ["training.trajectory_states=uniform_step"])
    with pytest.raises(T2VUError, match="trajectory_states"):
        _check_same_spec(resolved.to_dict(), changed, tmp_path / "ckpt")
