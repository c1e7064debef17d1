"""The toy world: one coloured shape moving on a plain dark background.

Everything here is deterministic and light (numpy only, no torch): the
vocabulary, the renderer, the captions, the train/held-out split of
(colour, shape, direction) combinations and the colour synonyms.

A clip is ``[F, 3, H, W]`` float32 in ``[0, 1]`` (4 frames of 32x32 RGB by
default). The models see it scaled to ``[-1, 1]`` (:func:`to_latent`).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Iterator, Optional

import numpy as np

#: Colour name -> RGB in [0, 1]. Orange and magenta are red's near neighbours
#: (hue 0 deg: orange ~33 deg, magenta ~307 deg), so preserving them is a real test.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (0.95, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.80, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "magenta": (0.90, 0.10, 0.80),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Direction -> (dx, dy) per frame in pixel units (image rows grow downwards).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
#: Words the base model's training captions also use for a colour. Erasing
#: "red" can be tested on "crimson" and "scarlet", which the eraser never sees.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald",),
    "blue": ("azure",),
    "yellow": ("golden",),
}
BACKGROUND: tuple[float, float, float] = (0.08, 0.08, 0.08)


@dataclass(frozen=True)
class World:
    """Sizes of the clips; the defaults are the shipped base model's world."""

    frames: int = 4
    size: int = 32  # height = width
    shape_size: int = 18  # pixels across a shape's bounding box
    speed: int = 3  # pixels per frame
    grid: int = 1  # start positions are multiples of this (4 = patch-aligned for patch_size 4)
    colors: dict = field(default_factory=lambda: dict(COLORS))
    shapes: tuple = SHAPES
    directions: dict = field(default_factory=lambda: dict(DIRECTIONS))
    synonyms: dict = field(default_factory=lambda: {k: list(v) for k, v in SYNONYMS.items()})
    background: tuple = BACKGROUND

    def __hash__(self) -> int:  # dict fields: hash the JSON form
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # -- vocabulary -----------------------------------------------------------
    def color_words(self, color: str) -> list[str]:
        """The colour's name followed by its synonyms."""
        return [color, *self.synonyms.get(color, [])]

    def words(self) -> list[str]:
        """Every word a caption can contain (in a fixed order)."""
        words = ["a", "moving", "shape"]
        for c in self.colors:
            words += self.color_words(c)
        return words + list(self.shapes) + list(self.directions)

    def combinations(self) -> list[tuple[str, str, str]]:
        return list(itertools.product(self.colors, self.shapes, self.directions))

    def held_out(self) -> list[tuple[str, str, str]]:
        """Combinations never in the base model's training captions.

        ``(colour index + shape index + direction index) % len(colours) == 0``:
        at most one direction per (colour, shape), at most one shape per
        (colour, direction), so every pair of attributes is still seen in
        training. With 6 colours, 3 shapes and 4 directions: 12 of 72.
        """
        cs, ss, ds = list(self.colors), list(self.shapes), list(self.directions)
        return [(c, s, d) for c, s, d in self.combinations()
                if (cs.index(c) + ss.index(s) + ds.index(d)) % len(cs) == 0]

    def train_combinations(self) -> list[tuple[str, str, str]]:
        held = set(self.held_out())
        return [x for x in self.combinations() if x not in held]

    # -- rendering --------------------------------------------------------------
    def start_range(self, direction: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """Inclusive ranges of the top-left corner (x, y) so the whole path fits."""
        dx, dy = self.directions[direction]
        travel = self.speed * (self.frames - 1)
        hi = self.size - self.shape_size
        xr = (travel, hi) if dx < 0 else (0, hi - travel) if dx > 0 else (0, hi)
        yr = (travel, hi) if dy < 0 else (0, hi - travel) if dy > 0 else (0, hi)
        return xr, yr

    def render(self, color: str, shape: str, direction: str, x: Optional[int] = None,
               y: Optional[int] = None) -> np.ndarray:
        """The clip ``[F, 3, H, W]`` in [0, 1]; (x, y) is the first frame's top-left corner
        (default: the middle of the allowed range)."""
        xr, yr = self.start_range(direction)
        x = (xr[0] + xr[1]) // 2 if x is None else x
        y = (yr[0] + yr[1]) // 2 if y is None else y
        if not (xr[0] <= x <= xr[1] and yr[0] <= y <= yr[1]):
            raise ValueError(f"start ({x}, {y}) outside {xr} x {yr} for direction {direction!r}")
        dx, dy = self.directions[direction]
        alpha = np.zeros((self.frames, self.size, self.size), np.float32)
        m = shape_mask(shape, self.shape_size)
        for f in range(self.frames):
            fx, fy = x + dx * self.speed * f, y + dy * self.speed * f
            alpha[f, fy:fy + self.shape_size, fx:fx + self.shape_size] = m
        bg = np.asarray(self.background, np.float32)[None, :, None, None]
        fg = np.asarray(self.colors[color], np.float32)[None, :, None, None]
        return bg + alpha[:, None] * (fg - bg)

    def random_clip(self, rng: np.random.Generator, color: str, shape: str, direction: str) -> np.ndarray:
        xr, yr = self.start_range(direction)
        xs = [v for v in range(xr[0], xr[1] + 1) if v % self.grid == 0]
        ys = [v for v in range(yr[0], yr[1] + 1) if v % self.grid == 0]
        x = xs[int(rng.integers(len(xs)))]
        y = ys[int(rng.integers(len(ys)))]
        return self.render(color, shape, direction, x, y)

    # -- captions -----------------------------------------------------------------
    @staticmethod
    def caption(color: Optional[str], shape: Optional[str], direction: Optional[str]) -> str:
        """``"a red circle moving left"``; ``None`` parts are left out."""
        words = ["a"]
        if color:
            words.append(color)
        words.append(shape or "shape")
        if direction:
            words += ["moving", direction]
        return " ".join(words)

    def training_caption(self, rng: np.random.Generator, color: str, shape: str, direction: str,
                         *, p_empty: float = 0.10, p_no_color: float = 0.10, p_no_shape: float = 0.05,
                         p_no_direction: float = 0.05, p_color_only: float = 0.05,
                         p_synonym: float = 0.5) -> str:
        """A caption of the clip, with the dropouts that make CFG and single words work:
        empty (CFG), attribute dropped, the colour word alone; a synonym half the time."""
        word = color
        syns = self.synonyms.get(color, [])
        if syns and rng.random() < p_synonym:
            word = syns[int(rng.integers(len(syns)))]
        r = rng.random()
        if r < p_empty:
            return ""
        r -= p_empty
        if r < p_color_only:
            return word
        r -= p_color_only
        if r < p_no_color:
            return self.caption(None, shape, direction)
        r -= p_no_color
        if r < p_no_shape:
            return self.caption(word, None, direction)
        r -= p_no_shape
        if r < p_no_direction:
            return self.caption(word, shape, None)
        return self.caption(word, shape, direction)

    def all_training_captions(self) -> list[str]:
        """Every caption :meth:`training_caption` can produce (sorted; ``""`` included)."""
        caps = {""}
        for c, s, d in self.train_combinations():
            for w in self.color_words(c):
                caps |= {w, self.caption(w, s, d), self.caption(None, s, d), self.caption(w, None, d),
                         self.caption(w, s, None)}
        return sorted(caps)

    def held_out_prompts(self) -> list[tuple[str, tuple[str, str, str]]]:
        """(caption with the plain colour name, (colour, shape, direction)) of each held-out combination."""
        return [(self.caption(c, s, d), (c, s, d)) for c, s, d in self.held_out()]

    def batches(self, seed: int, batch_size: int) -> Iterator[tuple[np.ndarray, list[str]]]:
        """Endless deterministic training batches: clips ``[B, F, 3, H, W]`` in [0, 1] and captions."""
        rng = np.random.default_rng(seed)
        combos = self.train_combinations()
        while True:
            clips, caps = [], []
            for _ in range(batch_size):
                c, s, d = combos[int(rng.integers(len(combos)))]
                clips.append(self.random_clip(rng, c, s, d))
                caps.append(self.training_caption(rng, c, s, d))
            yield np.stack(clips), caps

    # -- (de)serialisation ------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["shapes"] = list(d["shapes"])
        d["background"] = list(d["background"])
        d["colors"] = {k: list(v) for k, v in d["colors"].items()}
        d["directions"] = {k: list(v) for k, v in d["directions"].items()}
        d["held_out"] = [list(x) for x in self.held_out()]
        return d

    @classmethod
    def from_folder(cls, folder) -> "World":
        """The world a toy model folder was trained on (its ``world.json``)."""
        from pathlib import Path

        return cls.from_dict(json.loads((Path(folder) / "world.json").read_text()))

    @classmethod
    def from_dict(cls, d: dict) -> "World":
        d = {k: v for k, v in d.items() if k != "held_out"}
        return cls(frames=d["frames"], size=d["size"], shape_size=d["shape_size"], speed=d["speed"],
                   grid=d.get("grid", 1),
                   colors={k: tuple(v) for k, v in d["colors"].items()}, shapes=tuple(d["shapes"]),
                   directions={k: tuple(v) for k, v in d["directions"].items()},
                   synonyms={k: list(v) for k, v in d["synonyms"].items()},
                   background=tuple(d["background"]))


#: Area of each shape as a share of its ``L x L`` box, and its centroid's depth below the box top
#: in box heights (the apex-up triangle's centroid sits two thirds of the way down).
SHAPE_AREA = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
SHAPE_CENTROID_DEPTH = {"square": 0.5, "circle": 0.5, "triangle": 2 / 3}


def inside_shape(shape: str, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """Whether the points ``(u, v)`` (rows, columns from the box's top-left corner) lie in ``shape``.

    circle: a disc of diameter ``size``; square: the whole ``size x size`` box;
    triangle: apex at the top centre, base along the bottom edge.
    """
    in_box = (u >= 0) & (u <= size) & (v >= 0) & (v <= size)
    if shape == "square":
        return in_box
    if shape == "circle":
        r = size / 2
        return (u - r) ** 2 + (v - r) ** 2 <= r * r
    if shape == "triangle":
        return in_box & (np.abs(v - size / 2) <= u / 2)  # half width grows from 0 (apex) to size/2 (base)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(shape: str, size: float, top: float, left: float, height: int, width: int,
             supersample: int = 8) -> np.ndarray:
    """Anti-aliased coverage ``[height, width]`` in [0, 1] of ``shape`` (box side ``size``, box
    corner at ``(top, left)`` in pixel units, fractional allowed) on a ``height x width`` grid."""
    rows = (np.arange(height * supersample) + 0.5) / supersample - top
    cols = (np.arange(width * supersample) + 0.5) / supersample - left
    u, v = np.meshgrid(rows, cols, indexing="ij")
    inside = inside_shape(shape, u, v, size)
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3)).astype(np.float32)


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int, supersample: int = 8) -> np.ndarray:
    """Anti-aliased coverage ``[size, size]`` in [0, 1] of a shape filling its box (see :func:`inside_shape`)."""
    m = coverage(shape, size, 0.0, 0.0, size, size, supersample)
    m.setflags(write=False)
    return m


def to_latent(clip01):
    """[0, 1] -> [-1, 1] (works on numpy arrays and torch tensors)."""
    return clip01 * 2 - 1


def from_latent(latent):
    """[-1, 1] -> [0, 1], clamped (numpy or torch)."""
    x = (latent + 1) / 2
    return x.clip(0, 1) if isinstance(x, np.ndarray) else x.clamp(0, 1)


DEFAULT_WORLD = World()
