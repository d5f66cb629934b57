"""Procedural "textured shapes" segmentation data, generated on the fly from a seed.

Each 128x128 RGB image is a faintly textured grey background with 2-4 overlapping (occluding)
shapes drawn on it in random order: circles, rectangles (aspect 0.45-1, near axis-aligned) and
triangles (pointing up or down, vertices jittered), roughly 28-100 px across (7-25 patch tokens
of the model), anywhere in the image. Every shape gets a texture from the same four families (stripes at
a random angle and period, a rotated checkerboard, blocky noise, dots on a lattice) in two random
colours, and the background a texture from the same families in two close greys. So the
foreground / background decision is local, but a shape's interior says nothing about its class:
the per-pixel label (0 background, 1 circle, 2 rectangle, 3 triangle; the topmost shape wins) can
only be decided from the region's outline and extent, i.e. from context that lies tens of pixels
(up to ~10 tokens) away from the pixel, and occlusion leaves some regions with a partial outline only.

``make_batch(seed, n)`` returns ``(images float32 [n, 3, 128, 128] in about [-1, 1],
labels int64 [n, 128, 128])``; the same ``(seed, n)`` always gives the same tensors (numpy
``default_rng(seed)``). ``make_batch(seed, n, size=64)`` rasterises the same kind of scene (the
same scenes for the same seed) at 64x64, for the cheap low-resolution training phase. Generation
is vectorised over the batch (a batch of 32 at 128x128 takes ~0.15 s on the 2-core CI-like machine).

The module constants below define the dataset the committed weights were trained on.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CLASSES", "IMAGE_SIZE", "NUM_CLASSES", "generate", "make_batch"]

IMAGE_SIZE = 128
CLASSES = ("background", "circle", "rectangle", "triangle")
NUM_CLASSES = len(CLASSES)
MAX_SHAPES = 4
MIN_SHAPES = 2
N_TEXTURES = 4
ROTATE = False  # True: shapes at any rotation; False: rectangles near axis-aligned, triangles up/down
SHAPE_CONTRAST = 0.3  # max per-channel difference between a shape texture's two colours
JITTER = 0.2  # rotation jitter (radians) of the near-canonical poses


def _textures(rng: np.random.Generator, n: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A [n, H, W] float32 texture field in [0, 1], one random family and parameters per sample."""
    size = yy.shape[-1]
    family = rng.integers(0, N_TEXTURES, size=n)
    angle = rng.uniform(0, np.pi, size=(n, 1, 1)).astype(np.float32)
    period = rng.uniform(4.0, 11.0, size=(n, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 1, size=(n, 1, 1)).astype(np.float32)
    cell = rng.integers(3, 9, size=n)
    coarse = rng.random((n, IMAGE_SIZE // 3 + 1, IMAGE_SIZE // 3 + 1), dtype=np.float32)
    out = np.empty((n, size, size), dtype=np.float32)
    for fam in range(N_TEXTURES):
        idx = np.flatnonzero(family == fam)
        if idx.size == 0:
            continue
        a, p, ph = angle[idx], period[idx], phase[idx]
        if fam == 2:  # blocky noise: random values on a coarse grid, nearest-upsampled (cell 3..8 px)
            c = cell[idx][:, None, None]
            ri = np.minimum(yy.astype(np.int64)[None] // c, coarse.shape[1] - 1)
            ci = np.minimum(xx.astype(np.int64)[None] // c, coarse.shape[2] - 1)
            out[idx] = coarse[idx[:, None, None], ri, ci]
            continue
        cos, sin = np.cos(a), np.sin(a)
        u = xx * cos + yy * sin
        if fam == 0:  # stripes (a soft square wave)
            out[idx] = np.clip(2.5 * np.sin((2 * np.pi) * (u / p + ph)), -1, 1) * 0.5 + 0.5
            continue
        v = yy * cos - xx * sin
        if fam == 1:  # rotated checkerboard
            out[idx] = (np.floor(u / p + ph) + np.floor(v / p)) % 2
        else:  # dots on a rotated lattice
            du = (u / p + ph) % 1 - 0.5
            dv = (v / p) % 1 - 0.5
            out[idx] = du * du + dv * dv < 0.09
    return out


def _colourise(rng: np.random.Generator, tex: np.ndarray, background: bool = False) -> np.ndarray:
    """Texture [n, H, W] in [0, 1] -> RGB [n, 3, H, W] mixing two colours.

    Shapes: two independent random colours. Background: two close grey levels (a faint texture).
    """
    n = tex.shape[0]
    if background:
        grey = rng.uniform(0.3, 0.7, size=(n, 1, 1, 1)).astype(np.float32)
        c1 = np.repeat(grey, 3, axis=1)
        c2 = c1 + rng.uniform(-0.12, 0.12, size=(n, 1, 1, 1)).astype(np.float32)
    else:
        c1 = rng.uniform(0, 1, size=(n, 3, 1, 1)).astype(np.float32)
        c2 = c1 + rng.uniform(-SHAPE_CONTRAST, SHAPE_CONTRAST, size=(n, 3, 1, 1)).astype(np.float32)
    t = tex[:, None]
    return c1 * (1 - t) + c2 * t


def _shape_masks(rng: np.random.Generator, n: int, yy: np.ndarray, xx: np.ndarray):
    """One random shape per sample: (class [n] in 1..3, mask [n, H, W] bool)."""
    size = IMAGE_SIZE  # geometry is in 128-pixel units whatever the raster size
    cls = rng.integers(1, NUM_CLASSES, size=n)
    cy = rng.uniform(0.1 * size, 0.9 * size, size=(n, 1, 1))
    cx = rng.uniform(0.1 * size, 0.9 * size, size=(n, 1, 1))
    radius = rng.uniform(14.0, 40.0, size=(n, 1, 1))
    if ROTATE:
        angle = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
        vjit = 0.45
    else:
        # near-canonical poses: rectangles about axis-aligned, triangles pointing up or down
        angle = rng.uniform(-JITTER, JITTER, size=(n, 1, 1)) + np.where(
            rng.random((n, 1, 1)) < 0.5, -np.pi / 2, np.pi / 2
        )
        vjit = JITTER
    dy = yy - cy
    dx = xx - cx
    # circle
    circle = dx * dx + dy * dy < radius * radius
    # rotated rectangle with aspect ratio in [0.45, 1] (half-sides a >= b)
    aspect = rng.uniform(0.45, 1.0, size=(n, 1, 1))
    a = radius * 0.95
    b = a * aspect
    rect_angle = angle if ROTATE else angle + np.pi / 2
    u = dx * np.cos(rect_angle) + dy * np.sin(rect_angle)
    v = -dx * np.sin(rect_angle) + dy * np.cos(rect_angle)
    rect = (np.abs(u) < a) & (np.abs(v) < b)
    # triangle: three vertices at radius*[1.1, 1.45] around the centre, angles spread with jitter
    theta = angle + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]).reshape(1, 3, 1) + rng.uniform(
        -vjit, vjit, size=(n, 3, 1)
    )
    rv = radius[:, :, 0:1] * rng.uniform(1.1, 1.45, size=(n, 3, 1))
    vx = cx[:, :, 0:1] + rv * np.cos(theta)  # [n, 3, 1]
    vy = cy[:, :, 0:1] + rv * np.sin(theta)
    inside = None
    for i in range(3):
        j = (i + 1) % 3
        ex = (vx[:, j] - vx[:, i])[:, :, None]
        ey = (vy[:, j] - vy[:, i])[:, :, None]
        cross = ex * (yy - vy[:, i][:, :, None]) - ey * (xx - vx[:, i][:, :, None])
        side = cross > 0
        inside = side if inside is None else inside & side
    # vertices are in counter-clockwise angle order in (x, y) with y down -> all crosses > 0
    tri = inside
    c = cls[:, None, None]
    mask = np.where(c == 1, circle, np.where(c == 2, rect, tri))
    return cls, mask


def generate(seed: int, n: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """numpy version of :func:`make_batch`: (images float32 [n,3,S,S], labels int64 [n,S,S]).

    ``size`` other than 128 rasterises the same kind of scene at another resolution (all geometry
    and texture parameters are in 128-pixel units); used for the low-resolution training phase.
    """
    rng = np.random.default_rng(seed)
    coords = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(IMAGE_SIZE / size)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    image = _colourise(rng, _textures(rng, n, yy, xx), background=True)
    labels = np.zeros((n, size, size), dtype=np.int64)
    n_shapes = rng.integers(MIN_SHAPES, MAX_SHAPES + 1, size=n)
    for k in range(MAX_SHAPES):
        cls, mask = _shape_masks(rng, n, yy, xx)
        rgb = _colourise(rng, _textures(rng, n, yy, xx))
        mask = mask & (k < n_shapes)[:, None, None]
        image = np.where(mask[:, None], rgb, image)
        labels = np.where(mask, cls[:, None, None], labels)
    image = image + rng.normal(0, 0.04, size=image.shape).astype(np.float32)
    image = image * 2 - 1
    return image, labels


def make_batch(seed: int, n: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [n, 3, 128, 128], labels int64 [n, 128, 128]), deterministic in (seed, n)."""
    image, labels = generate(seed, n, size)
    return torch.from_numpy(image), torch.from_numpy(labels)
