"""Deterministic judges of toy-world videos: colour, shape, motion. No learning.

Each judge is called as ``judge(video) -> label`` with ``video`` a float
``[F, 3, H, W]`` tensor (or array) in ``[0, 1]``; it has ``attribute``
(``"color"``, ``"shape"``, ``"motion"``) and ``labels`` (every possible answer;
``"none"`` when there is no object to judge, or for motion, no travel).

All three share one segmentation (:func:`segment`): the background is the
median colour of the frame borders; a pixel belongs to the object when its
RGB distance from the background exceeds half of the video's strong
(98th-percentile) distance; per frame only the largest 4-connected blob is
kept, so speckle noise and small stray blobs of a model's sample are ignored.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

from t2vu_toy.world import DEFAULT_WORLD, SHAPE_AREA, SHAPE_CENTROID_DEPTH, World, coverage

NONE = "none"
MIN_STRENGTH = 0.2  # below this the video holds no object (RGB distance from the background)
MIN_SATURATION = 0.25  # a less saturated object has no colour of the palette
MIN_TRAVEL = 0.5  # pixels per frame below which the object is still


def _as_array(video) -> np.ndarray:
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    v = np.asarray(video, dtype=np.float32)
    if v.ndim != 4 or v.shape[1] != 3:
        raise ValueError(f"expected a video [F, 3, H, W], got shape {tuple(v.shape)}")
    return v


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2-D bool mask (iterative flood fill)."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


@dataclass
class Segmentation:
    video: np.ndarray  # [F, 3, H, W]
    background: np.ndarray  # [3]
    strength: np.ndarray  # [F, H, W] RGB distance from the background
    masks: np.ndarray  # [F, H, W] bool, the object's largest blob per frame
    peak: float

    @property
    def found(self) -> np.ndarray:
        """[F] bool: frames in which an object was found."""
        return self.masks.reshape(self.masks.shape[0], -1).sum(1) >= 4


def segment(video) -> Segmentation:
    v = _as_array(video)
    border = np.concatenate([v[:, :, 0, :], v[:, :, -1, :], v[:, :, 1:-1, 0], v[:, :, 1:-1, -1]], axis=2)
    background = np.median(border.transpose(1, 0, 2).reshape(3, -1), axis=1)
    strength = np.sqrt(((v - background[None, :, None, None]) ** 2).sum(1))
    peak = float(np.quantile(strength, 0.98))
    if peak < MIN_STRENGTH:
        masks = np.zeros(strength.shape, bool)
    else:
        masks = np.stack([_largest_blob(s > 0.5 * peak) for s in strength])
    return Segmentation(v, background, strength, masks, peak)


class Judge:
    """Base class: ``judge(video) -> label``; ``judge.batch(videos) -> [labels]``."""

    attribute: str = ""
    labels: tuple[str, ...] = ()

    def __init__(self, options=None, world: Optional[World] = None):
        self.options = options
        self.world = world or DEFAULT_WORLD

    def __call__(self, video) -> str:
        return self.judge_segmentation(segment(video))

    def judge_segmentation(self, seg: Segmentation) -> str:
        raise NotImplementedError

    def batch(self, videos) -> list[str]:
        return [self(v) for v in videos]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attribute={self.attribute!r}, labels={self.labels!r})"


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*[float(c) for c in rgb])[0] * 360.0


class ColorJudge(Judge):
    """The palette colour whose hue is closest to the object's (circular distance)."""

    attribute = "color"

    def __init__(self, options=None, world: Optional[World] = None):
        super().__init__(options, world)
        self.palette = {name: _hue(rgb) for name, rgb in self.world.colors.items()}
        self.labels = (*self.world.colors, NONE)

    def color_of(self, seg: Segmentation) -> Optional[np.ndarray]:
        """Mean RGB of the object's core (pixels at >= 75% of the peak strength)."""
        core = seg.masks & (seg.strength >= 0.75 * seg.peak)
        if core.sum() < 4:
            return None
        pix = seg.video.transpose(0, 2, 3, 1)[core]  # [N, 3]
        return pix.mean(0)

    def judge_segmentation(self, seg: Segmentation) -> str:
        rgb = self.color_of(seg)
        if rgb is None:
            return NONE
        rgb = np.clip(rgb, 0, 1)
        _, s, val = colorsys.rgb_to_hsv(*[float(c) for c in rgb])
        if s < MIN_SATURATION or val < 0.2:
            return NONE
        h = _hue(rgb)
        return min(self.palette, key=lambda n: min(abs(h - self.palette[n]), 360 - abs(h - self.palette[n])))


def _smooth(x: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 binomial filter along the last two axes (edge values repeated)."""
    for axis in (-2, -1):
        p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1) if a == axis % x.ndim else (0, 0)
                                                  for a in range(x.ndim - 2, x.ndim)], mode="edge")
        n = x.shape[axis]
        lo = np.take(p, range(0, n), axis=axis)
        mid = np.take(p, range(1, n + 1), axis=axis)
        hi = np.take(p, range(2, n + 2), axis=axis)
        x = (lo + 2 * mid + hi) / 4
    return x


class ShapeJudge(Judge):
    """Circle, square or triangle: the world shape whose outline best overlaps each frame's blob.

    The blob is re-cut from the object map smoothed by a 3x3 binomial filter
    (speckle noise would otherwise fray its outline). Each world shape is then
    drawn with the blob's area and its centroid on the blob's centroid
    (:func:`~t2vu_toy.world.coverage`, anti-aliased), and scored by its
    intersection over union with the blob; the per-frame medians pick the
    shape. Area and centroid barely move when a model's sample has a stray
    column, a chipped corner or a frayed edge, so a rough square stays a
    square; features of the bounding box (such as area / box area) do not
    survive one stray pixel column.
    """

    attribute = "shape"

    def __init__(self, options=None, world: Optional[World] = None):
        super().__init__(options, world)
        self.labels = (*self.world.shapes, NONE)

    def scores(self, blob: np.ndarray) -> np.ndarray:
        """IoU of ``blob`` (2-D bool) with each world shape of its area on its centroid."""
        ys, xs = np.nonzero(blob)
        area, cy, cx = float(len(ys)), ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
        b = blob.astype(np.float32)
        out = []
        for shape in self.world.shapes:
            size = np.sqrt(area / SHAPE_AREA[shape])
            t = coverage(shape, size, cy - SHAPE_CENTROID_DEPTH[shape] * size, cx - size / 2, *blob.shape,
                         supersample=4)
            out.append(np.minimum(b, t).sum() / np.maximum(b, t).sum())
        return np.asarray(out)

    def measure(self, seg: Segmentation) -> Optional[np.ndarray]:
        """Median per-shape IoU over the frames with an object (None: no object)."""
        if not seg.found.any():
            return None
        smooth = _smooth(seg.strength)
        per_frame = []
        for f in np.nonzero(seg.found)[0]:
            blob = _largest_blob(smooth[f] > 0.5 * seg.peak)
            if blob.sum() >= 4:
                per_frame.append(self.scores(blob))
        return np.median(np.asarray(per_frame), axis=0) if per_frame else None

    def judge_segmentation(self, seg: Segmentation) -> str:
        scores = self.measure(seg)
        if scores is None:
            return NONE
        return tuple(self.world.shapes)[int(np.argmax(scores))]


class MotionJudge(Judge):
    """Direction of the centroid's travel: the dominant axis of the least-squares velocity."""

    attribute = "motion"

    def __init__(self, options=None, world: Optional[World] = None):
        super().__init__(options, world)
        self.labels = (*self.world.directions, NONE)

    @staticmethod
    def centroids(seg: Segmentation) -> tuple[np.ndarray, np.ndarray]:
        """(frame indices, [n, 2] (x, y) strength-weighted centroids) of frames with an object."""
        idx, pts = [], []
        for f, (m, ok) in enumerate(zip(seg.masks, seg.found)):
            if not ok:
                continue
            wgt = seg.strength[f] * m
            ys, xs = np.mgrid[0:m.shape[0], 0:m.shape[1]]
            idx.append(f)
            pts.append(((wgt * xs).sum() / wgt.sum(), (wgt * ys).sum() / wgt.sum()))
        return np.asarray(idx, float), np.asarray(pts, float).reshape(-1, 2)

    def velocity(self, seg: Segmentation) -> Optional[np.ndarray]:
        f, pts = self.centroids(seg)
        if len(f) < 2:
            return None
        fc = f - f.mean()
        return (fc[:, None] * (pts - pts.mean(0))).sum(0) / (fc ** 2).sum()  # px per frame (vx, vy)

    def judge_segmentation(self, seg: Segmentation) -> str:
        vel = self.velocity(seg)
        if vel is None or np.hypot(*vel) < MIN_TRAVEL:
            return NONE
        vx, vy = vel
        unit = {name: np.asarray(d, float) / max(1e-9, np.hypot(*d)) for name, d in self.world.directions.items()}
        return max(unit, key=lambda n: float(unit[n] @ vel))


JUDGES = {"color": ColorJudge, "shape": ShapeJudge, "motion": MotionJudge}


@lru_cache(maxsize=8)
def judges_for(world: World) -> dict[str, Judge]:
    """One judge of each attribute for ``world`` (cached)."""
    return {attr: cls(world=world) for attr, cls in JUDGES.items()}


def judge_all(video, world: Optional[World] = None) -> dict[str, str]:
    """``{"color": ..., "shape": ..., "motion": ...}`` from one segmentation."""
    seg = segment(video)
    return {attr: j.judge_segmentation(seg) for attr, j in judges_for(world or DEFAULT_WORLD).items()}


def accuracy(videos, truths: Sequence[tuple[str, str, str]], world: Optional[World] = None) -> dict[str, float]:
    """Per-attribute accuracy of ``videos`` against (colour, shape, direction) truths, plus ``all``
    (every attribute right)."""
    hits = {"color": 0, "shape": 0, "motion": 0, "all": 0}
    for video, (c, s, d) in zip(videos, truths):
        got = judge_all(video, world)
        ok = [got["color"] == c, got["shape"] == s, got["motion"] == d]
        for k, o in zip(("color", "shape", "motion"), ok):
            hits[k] += o
        hits["all"] += all(ok)
    n = max(1, len(truths))
    return {k: v / n for k, v in hits.items()}
