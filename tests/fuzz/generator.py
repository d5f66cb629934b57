"""Seeded random models with a known ground-truth token layout at every attention site.

A case is a :class:`Spec` (plain data; its ``repr`` is the reproducible spec text). ``build(spec)``
makes the model and its inputs and, by simulating the token order through every op, the
:class:`SiteTruth` of each attention module: which original token (prefix/suffix/extra, image
pixel ``(r, c)``, or video token :class:`Voxel` ``(t, r, c)``) sits at each sequence position of
its queries and keys. From that order alone the fuzzer decides whether a site is an image (any
raster: the image axes stored in any order, possibly mirrored - mirroring maps grid groups
one-to-one, so the grid mask is the same; not window tiles, so a mirrored raster is no image under
window grouping) and builds the oracle mask ``log M`` with groups taken from the original pixel
coordinates (tests/oracle.py ``coord_group``; docs/design.md section 1).

Video cases (``Spec.frames > 0``): a clip ``(B, 3, T*pt, H*p, W*p)`` through a Conv3d patch
embedding (or frames folded into the batch for a per-frame conv and merged back, CogVideoX), then
a video tokenizer; the token order right after the embedding is read by running the tokenizer on a
tensor of token ids (:func:`traced_order`), so a tokenizer cannot be described wrongly.

Every attention module has ``self.oracle = None``; the checker sets it to an additive
``(Lq, Lk)`` tensor and the module adds it to its own scores/mask (eager only). Like
tests/models.py, this module must not import gridattn_fx.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import standin_ops
from oracle import as_additive, coord_group, mask_from_groups, stride_tuple

standin_ops.register()  # the op forms call flash-attn's op (its CPU stand-in where it is not installed)

DIM = 16

# --- the vocabulary ------------------------------------------------------------------------------
# Token orders right after the patch embedding (B, C, H, W) -> (B, L, C).
TOKENIZERS = {
    "nchw": "flatten(2).transpose(1, 2)",
    "nchw_T": "transpose(2, 3).flatten(2).transpose(1, 2)   (column-major)",
    "nhwc": "permute(0, 2, 3, 1).reshape(B, H*W, C)",
    "nhwc_T": "permute(0, 3, 2, 1).reshape(B, W*H, C)   (column-major)",
    "nhwc_flat": "permute(0, 2, 3, 1).flatten(1, 2)",
    "mirror": "flip(3).flatten(2).transpose(1, 2)   (mirrored image: still a raster)",
}
# Patch embeddings (B, 3, H, W) -> (B, C, h, w): the same values and token positions each way, through
# the video machinery of the layout proof for the last two (a single-frame Conv3d output, T = 1,
# is an image; the batch as the frames of one clip, folded back into the batch, is one image each).
EMBEDDINGS = {
    "conv2d": "Conv2d(3, C, p, p)",
    "conv3d_t1": "Conv3d(3, C, (1, p, p)) on img.unsqueeze(2), then flatten(2, 3)",
    "conv3d_frames": "Conv3d(3, C, (1, p, p)) on the batch as one clip's frames, permute + flatten(0, 1)",
}
# Video cases: the patch embedding of a clip (B, 3, T*pt, H*p, W*p), ending in (B, T*H*W, C) tokens.
VIDEO_EMBEDDINGS = {
    "conv3d_video": "Conv3d(3, C, (pt, p, p)) -> (B, C, T, H, W), then a VIDEO_TOKENIZERS entry",
    "conv3d_frames_merged": "Conv3d(3, C, (pt, p, p)), frames folded into the batch (B*T, C, H, W), "
                            "a TOKENIZERS entry per frame, reshape(B, T*H*W, C)",
    "frames_conv2d": "clip as (B*T, 3, H*p, W*p) frames, Conv2d(3, C, p, p), a TOKENIZERS entry per frame, "
                     "view(B, T, H*W, C).flatten(1, 2)   (CogVideoX; pt = 1)",
}
# Token orders of a (B, C, T, H, W) video -> (B, L, C); the storage order of (t, h, w) in brackets.
VIDEO_TOKENIZERS = {
    "v_nchw": "flatten(2).transpose(1, 2)   (t, h, w): row-major",
    "v_nhwc": "permute(0, 2, 3, 4, 1).reshape(B, T*H*W, C)   (t, h, w)",
    "v_nhwc_flat": "permute(0, 2, 3, 4, 1).flatten(1, 3)   (t, h, w)",
    "v_cols": "permute(0, 2, 4, 3, 1).reshape(B, T*W*H, C)   (t, w, h): column-major frames",
    "v_th": "transpose(2, 3).flatten(2).transpose(1, 2)   (h, t, w): frames inside rows",
    "v_rev": "permute(0, 4, 3, 2, 1).reshape(B, W*H*T, C)   (w, h, t)",
    "v_mirror": "flip(2).flatten(2).transpose(1, 2)   (time reversed: still a raster)",
    # (B, T, H, W, C) read as (B, H, T, W, C) (no data moved) and permuted back: frames and rows
    # scrambled (T != H), not a raster; T == H happens to be the (h, t, w) order
    "v_scramble": "permute(0, 2, 3, 4, 1).reshape(B, H, T, W, C).permute(0, 2, 1, 3, 4).reshape(B, L, C)",
}
# Tokenizers whose order the pass documents it proves (docs/design.md section 1: the storage order
# of the image axes is recorded when the dataflow proves it): a skip is a missed rewrite.
VIDEO_PROVABLE_TOKENIZERS = ("v_nchw", "v_nhwc", "v_nhwc_flat", "v_cols", "v_th", "v_rev")
# video strides: int G and pairs mean Gt = 1, a triple is (Gt, Gh, Gw) (docs/design.md section 1)
VIDEO_STRIDES = (1, 2, (2, 3), (2, 2, 2), (1, 2, 2), (2, 1, 2), (2, 2, 1), (3, 2, 2))
VIDEO_STRIDE_WEIGHTS = (1, 3, 2, 3, 2, 2, 1, 1)
GROUPINGS = ("grid", "window")
HEAD_GROUPINGS = (("grid", "window"), ("window", "grid"))   # per-head groupings: two equal head sets

# Per-token ops on (B, L, C) that keep every token where it is (the proof should go through).
KEEP_OPS = ("ln", "linear", "gelu", "affine", "pos", "view_split", "transpose_rt", "channel_slice",
            "append_slice", "drop_front", "add_prefix", "add_suffix",
            # tokens (no prefix/suffix) -> (B, C, H, W) -> depthwise conv -> tokens: a new row-major
            # image whatever the order was (a no-op where the stream has other tokens); on a video
            # (B, C, T, H, W) and a depthwise Conv3d: a new row-major video
            "conv_roundtrip")
# Image tokens (no prefix/suffix) -> (B, C, h, w) -> 2x2 stride-2 conv -> tokens of an image of
# half the size (SegFormer's reduced keys on the key/value side, a downsampling stage on the stream);
# on a video a (kt, 2, 2) stride-(kt, 2, 2) Conv3d, kt in {1, 2}.
REDUCE_OPS = ("sr_conv",)
# Ops that move tokens: the generator tracks the new order; most leave no raster image.
REORDER_OPS = ("roll", "gather", "index_select", "flip", "inplace_roll", "index_copy")
INPLACE_OPS = ("inplace_roll", "index_copy")
# Ops that keep every token in place but that the pass need not prove through (only soundness
# is checked after them).
EXOTIC_KEEP_OPS = ("batch_flip", "channel_flip", "cumsum")
# Ops after which no position is one pixel any more: tokens mixed by a reshape of (B, C, L) as
# (B, L, C), or every token twice.
BREAK_OPS = ("mix_reshape", "dup_tokens")
ALL_OPS = KEEP_OPS + REDUCE_OPS + EXOTIC_KEEP_OPS + REORDER_OPS + BREAK_OPS

SDPA_FORMS = ("sdpa", "sdpa_scale", "sdpa_gqa", "sdpa_mqa", "sdpa_causal")
MANUAL_FORMS = ("m_qscale", "m_scores_scale", "m_div_sqrt", "m_mT", "m_baddbmm", "m_bmm", "m_einsum",
                "m_tensor_scale", "m_v_attnT", "m_mqa")
MHA_FORMS = ("mha_batch_first", "mha_seq_first")
FORMS = SDPA_FORMS + MANUAL_FORMS + MHA_FORMS
MASK_SHAPES = ("LL", "11LL", "1HLL", "B11L", "B1LL", "1L", "H1L")
STRIDES = (1, 2, (2, 3), 4)
STRIDE_WEIGHTS = (1, 3, 2, 2)


@dataclass(frozen=True)
class BlockSpec:
    ops: tuple = ()            # token ops applied to the stream before this block: (name, param)
    kv_ops: tuple = ()         # token ops applied to this attention's key/value input only
    form: str = "sdpa"
    heads: int = 2
    mask: str = "none"         # "none" | "bool:<shape>" | "add:<shape>"
    cross: bool = False        # q from the first half of the batch, k/v from the second (other images)
    kernel: str = "flash"      # an op form's kernel: OP_KERNELS (drawn last, see random_spec)


# The attention ops an op form calls (CPU stand-ins of tests/standin_ops.py): flash-attn 2, FA3's
# Python op, xformers' flash op, flash-attn's varlen op over a flattened batch (one sequence each).
OP_KERNELS = ("flash", "fa3", "xformers", "varlen")


@dataclass(frozen=True)
class Spec:
    seed: int
    dtype: str = "float64"
    batch: int = 1             # images per attention side (a cross-image model gets twice as many)
    height: int = 4            # image size in tokens
    width: int = 4
    patch: int = 1
    tokenizer: str = "nchw"
    prefix: int = 0
    suffix: int = 0
    blocks: tuple = (BlockSpec(),)
    stride: object = 2
    move_regrouping: bool = True
    implementation: str = "grouped"
    compiled: object = False   # also run through torch.compile(backend="gridattn"); "dynamic": dynamic=True
    outputs: str = "last"      # "last" | "all": also return every stage's tokens (other readers)
    embed: str = "conv2d"      # EMBEDDINGS (VIDEO_EMBEDDINGS for a video case)
    # drawn after everything above (random_spec), so their defaults leave every older spec as it was
    grouping: object = "grid"  # GROUPINGS or HEAD_GROUPINGS, the config's ``grouping``
    frames: int = 0            # a video case: T frames of tokens (0: an image case)
    tpatch: int = 1            # temporal patch pt of a video's Conv3d embedding
    # compiled cases only: stages before which the model's forward breaks Dynamo's graph
    # (torch._dynamo.graph_break()); the layout is handed across by tensor identity
    breaks: tuple = ()

    @property
    def video_shape(self) -> tuple:
        """The token grid right after the patch embedding: (T, H, W) of a video, (H, W) of an image."""
        return (self.frames, self.height, self.width) if self.frames else (self.height, self.width)

    def text(self) -> str:
        return repr(self)


# --- random specs ------------------------------------------------------------------------------
def random_spec(seed: int, compiled: object = False) -> Spec:
    rng = random.Random(seed)
    stride = rng.choices(STRIDES, STRIDE_WEIGHTS)[0]
    gh, gw = stride_tuple(stride)
    # mostly images big enough for >= 2 tokens per group, sometimes smaller (1-token groups)
    if rng.random() < 0.85:
        height = rng.randint(max(2, 2 * gh), max(2, 2 * gh) + 4)
        width = rng.randint(max(2, 2 * gw), max(2, 2 * gw) + 4)
    else:
        height, width = rng.randint(1, 4), rng.randint(2, 5)
    if rng.random() < 0.3:
        width = height  # square
    depth = rng.choice((1, 1, 2, 2, 3))
    cross_at = rng.randrange(depth) if rng.random() < 0.08 else None
    blocks = []
    for i in range(depth):
        blocks.append(_random_block(rng, first=(i == 0), cross=(i == cross_at)))
    spec = Spec(
        seed=seed,
        dtype=rng.choice(("float64", "float64", "float64", "float32")),
        batch=rng.choice((1, 2)),
        height=height,
        width=width,
        patch=rng.choice((1, 2)),
        tokenizer=rng.choice(("nchw", "nchw", "nchw_T", "nhwc", "nhwc_T", "nhwc_flat", "mirror")),
        prefix=rng.choice((0, 0, 1, 1, 2, 5)),
        suffix=rng.choice((0, 0, 0, 1, 3)),
        blocks=tuple(blocks),
        stride=stride,
        move_regrouping=rng.random() < 0.75,
        implementation="grouped" if rng.random() < 0.85 else "masked",
        compiled=compiled,
        outputs="all" if rng.random() < 0.2 else "last",
        # drawn last: the fields above stay what they were for every seed
        embed=rng.choice(("conv2d",) * 4 + ("conv3d_t1", "conv3d_frames")),
    )
    # Drawn after every field above (the same rule again): a seed whose new draws are the defaults
    # (grid grouping, an image) builds the model it always built.
    if rng.random() < 0.15:
        spec = replace(spec, grouping="window")
    if rng.random() < 0.3:
        spec = _video_spec(rng, spec)
    # Drawn last (the same rule): some unmasked SDPA blocks call flash-attn's op instead (the CPU
    # stand-in of tests/standin_ops.py; gridattn_fx/patterns/attention_ops.py), on (B, L, H, D).
    if rng.random() < 0.35:
        to_op = {"sdpa": "op_flash", "sdpa_scale": "op_flash_scale", "sdpa_gqa": "op_flash_gqa",
                 "sdpa_mqa": "op_flash_mqa", "sdpa_causal": "op_flash_causal"}
        spec = replace(spec, blocks=tuple(
            replace(b, form=to_op[b.form]) if b.form in to_op and b.mask == "none" else b for b in spec.blocks))
        # Drawn after that (the same rule): which op each op form calls
        spec = replace(spec, blocks=tuple(
            replace(b, kernel=rng.choice(OP_KERNELS)) if b.form.startswith("op_") else b
            for b in spec.blocks))
    # Drawn last (the same rule), compiled cases only: graph breaks between stages.
    if compiled and rng.random() < 0.4:
        spec = replace(spec, breaks=tuple(i for i in range(len(spec.blocks)) if rng.random() < 0.6) or (0,))
    # Drawn last (the same rule): per-head groupings, half the heads on the grid, half in windows.
    if rng.random() < 0.15:
        spec = replace(spec, grouping=rng.choice(HEAD_GROUPINGS))
    return spec


def _video_spec(rng: random.Random, spec: Spec) -> Spec:
    """``spec`` made a video case: stride, sizes, embedding and tokenizer redrawn for a clip (the
    blocks, dtype, prefix/suffix and options drawn for the image stay)."""
    stride = rng.choices(VIDEO_STRIDES, VIDEO_STRIDE_WEIGHTS)[0]
    gt, gh, gw = stride_tuple(stride, 3)
    # mostly a real video with >= 2 tokens per group along each axis; sometimes T = 1 (an image),
    # or axes as small as the stride (one token per group along them) or smaller
    frames = rng.choice((1, max(2, gt), 2 * gt, 2 * gt, 2 * gt + 1)) if rng.random() < 0.85 else rng.randint(1, 3)
    if rng.random() < 0.85:
        height, width = rng.randint(2 * gh, 2 * gh + 2), rng.randint(2 * gw, 2 * gw + 2)
    else:
        height, width = rng.randint(max(1, gh - 1), gh + 1), rng.randint(max(1, gw - 1), gw + 2)
    embed = rng.choice(("conv3d_video",) * 3 + ("conv3d_frames_merged", "frames_conv2d"))
    if embed == "conv3d_video":
        tokenizer = rng.choice(("v_nchw",) * 3 + tuple(VIDEO_TOKENIZERS))
    else:  # tokens per frame, then the frames merged into the sequence
        tokenizer = rng.choice(("nchw", "nchw", "nchw_T", "nhwc", "nhwc_T", "nhwc_flat", "mirror"))
    return replace(spec, stride=stride, frames=frames, height=height, width=width, embed=embed,
                   tokenizer=tokenizer, tpatch=1 if embed == "frames_conv2d" else rng.choice((1, 2)),
                   patch=rng.choice((1, 2)))


def _random_block(rng: random.Random, first: bool, cross: bool) -> BlockSpec:
    n_ops = rng.choice((0, 1, 1, 2, 3)) if first else rng.choice((0, 0, 0, 1))
    ops = tuple(_random_op(rng) for _ in range(n_ops))
    kv_ops = tuple(_random_op(rng) for _ in range(rng.choice((0,) * 12 + (1, 2))))
    form = rng.choice(FORMS)
    heads = rng.choice((1, 2, 4)) if form.startswith("mha") else rng.choice((2, 4))
    mask = "none"
    if not form.startswith("mha") and rng.random() < 0.4:
        mask = f"{rng.choice(('bool', 'add'))}:{rng.choice(MASK_SHAPES)}"
    elif form.startswith("mha") and rng.random() < 0.3:
        mask = "add:LL"
    if form == "sdpa_causal":  # SDPA refuses attn_mask together with is_causal
        mask = "none"
    return BlockSpec(ops=ops, kv_ops=kv_ops, form=form, heads=heads, mask=mask, cross=cross)


def _random_op(rng: random.Random) -> tuple:
    u = rng.random()
    group = (KEEP_OPS if u < 0.66 else REDUCE_OPS if u < 0.7 else EXOTIC_KEEP_OPS if u < 0.78
             else REORDER_OPS if u < 0.95 else BREAK_OPS)
    return (rng.choice(group), rng.randrange(1 << 16))


# --- ground truth ------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Voxel:
    """A token of a video: frame ``t``, row ``r``, column ``c`` of the clip's token grid (of the
    clip reduced ``level`` times). A class of its own, so that no image token ``(r, c)`` /
    ``(r, c, level)`` and no non-image token can ever be read as one."""
    t: int
    r: int
    c: int
    level: int = 0

    def __str__(self):
        return f"t{self.t},{self.r},{self.c}" + (f"@{self.level}" if self.level else "")


def _is_pixel(tok) -> bool:
    """Image tokens are (r, c) of the input image or (r, c, level) of a reduced image; video tokens
    are Voxels."""
    return isinstance(tok, Voxel) or isinstance(tok[0], int)


def _level(tok) -> int:
    if isinstance(tok, Voxel):
        return tok.level
    return tok[2] if len(tok) == 3 else 0


def _coords(tok) -> tuple:
    """Logical coordinates of an image token: (t, r, c) of a video, (r, c) of an image."""
    return (tok.t, tok.r, tok.c) if isinstance(tok, Voxel) else tuple(tok[:2])


def _raster(dims: tuple, level: int) -> list:
    if len(dims) == 3:
        return [Voxel(t, r, c, level) for t, r, c in np.ndindex(*dims)]
    h, w = dims
    return [(r, c) if level == 0 else (r, c, level) for r in range(h) for c in range(w)]


def image_span(order, levels: dict) -> tuple | None:
    """(start, level) of the contiguous run of positions that holds every pixel of one image once
    (in any order: a model that slices them out, reshapes them to (B, C, h, w) and convolves makes
    a new row-major image), with only non-image tokens around it; None if there is none."""
    pos = [i for i, t in enumerate(order) if _is_pixel(t)]
    if not pos or pos[-1] - pos[0] != len(pos) - 1:
        return None
    lv = _level(order[pos[0]])
    run = order[pos[0]:pos[-1] + 1]
    return (pos[0], lv) if sorted(run) == _raster(levels[lv], lv) else None


@dataclass
class SiteTruth:
    path: str                  # module path of the attention module (model.named_modules())
    block: int
    spec: BlockSpec
    q_order: list              # original token at each query position
    k_order: list
    cross: bool
    q_image: tuple | None      # (prefix, suffix, description) when the tokens are a raster image
    k_image: tuple | None
    ops_before: tuple          # every token op on the provenance path from the patch embedding
    kv_ops: tuple              # ops on the key/value side only
    batch: int                 # batch of the attention's queries
    levels: dict | None = None  # {level: image sizes}: (H, W) or (T, H, W) of each image (reduction)
    roots: dict | None = None  # {level: root level}: levels of one root are one image (or its reductions)
    grouping: object = "grid"   # a name, or a tuple of names per equal head set

    @property
    def groupings(self) -> tuple:
        return self.grouping if isinstance(self.grouping, tuple) else (self.grouping,)

    @property
    def causal(self) -> bool:
        return self.spec.form in ("sdpa_causal", "op_flash_causal")

    @property
    def mirrored_window(self) -> bool:
        """A mirrored raster under window grouping: its tiles are not the image's tiles (x // tile
        differs from (n - 1 - x) // tile where the tile does not divide n), so it is no image here."""
        return "window" in self.groupings and any(side is not None and side[3] for side in (self.q_image, self.k_image))

    @property
    def other_images(self) -> bool:
        """Queries and keys are rasters of different images (one a conv of reordered tokens)."""
        def root(order):
            lv = next((_level(t) for t in order if _is_pixel(t)), 0)
            return (self.roots or {}).get(lv, 0)
        return self.q_image is not None and self.k_image is not None and root(self.q_order) != root(self.k_order)

    @property
    def is_image_self_attention(self) -> bool:
        return (self.q_image is not None and self.k_image is not None and not self.cross and not self.causal
                and not self.mirrored_window and not self.other_images)

    def describe(self) -> str:
        if self.cross:
            return "cross-image (queries and keys from different images)"
        if self.causal:
            return "causal attention (is_causal=True)"
        if self.other_images:
            return f"q {self.q_image[2]} and k {self.k_image[2]} are different images (a conv of reordered tokens)"
        if self.mirrored_window:
            return f"a mirrored raster under window grouping (q {self.q_image[2]}, k {self.k_image[2]})"
        if self.q_image is None:
            return f"queries not an image (token order {_short(self.q_order)})"
        if self.k_image is None:
            return f"keys not an image (token order {_short(self.k_order)})"
        if self.q_image[2] == self.k_image[2]:
            return self.q_image[2]
        return f"q {self.q_image[2]}, k {self.k_image[2]}"

    def log_mask(self, stride, dtype) -> torch.Tensor:
        """log M for this site's true token order (groups from the original pixel coordinates, each
        side on its own image, with the site's grouping); with per-head groupings (heads, Lq, Lk),
        head h masked by the grouping of its equal contiguous set."""
        assert self.is_image_self_attention

        def groups(order, grouping):
            return [coord_group(_coords(t), self.levels[_level(t)], stride, grouping) if _is_pixel(t)
                    else None for t in order]

        masks = [torch.from_numpy(np.where(mask_from_groups(groups(self.q_order, g), groups(self.k_order, g)),
                                           0.0, -np.inf)).to(dtype) for g in self.groupings]
        if len(masks) == 1 or self.spec.heads % len(masks):
            return masks[0]   # heads that do not split: the site stays dense, this mask is not used
        return torch.stack(masks).repeat_interleave(self.spec.heads // len(masks), dim=0)


def _short(order, n=12) -> str:
    toks = [str(t) if isinstance(t, Voxel) else ",".join(map(str, t)) if _is_pixel(t) else f"{t[0]}{t[1]}"
            for t in order[:n]]
    return "[" + " ".join(toks) + (" ...]" if len(order) > n else "]")


def classify_image(order, levels):
    """(prefix, suffix, description, mirrored) when ``order`` is non-image tokens, a raster image,
    non-image tokens; None otherwise. ``levels``: {level: (height, width) or (T, H, W)} of the images
    (or one such shape)."""
    if isinstance(levels, tuple):
        levels = {0: levels}
    pos = [i for i, t in enumerate(order) if _is_pixel(t)]
    lvs = {_level(order[i]) for i in pos}
    if len(lvs) != 1:
        return None
    lv = lvs.pop()
    if len(levels[lv]) == 3:
        return _classify_video(order, pos, levels[lv], lv)
    height, width = levels[lv]
    n = height * width
    if len(pos) != n or (n and pos[-1] - pos[0] != n - 1):
        return None
    pixels = [order[i] for i in pos]
    if len(set(pixels)) != n:
        return None
    for major in ("row", "col"):
        for flip_r in (False, True):
            for flip_c in (False, True):
                cand = []
                outer, inner = (height, width) if major == "row" else (width, height)
                for a in range(outer):
                    for b in range(inner):
                        r, c = (a, b) if major == "row" else (b, a)
                        rc = (height - 1 - r if flip_r else r, width - 1 - c if flip_c else c)
                        cand.append(rc if lv == 0 else rc + (lv,))
                if cand == pixels:
                    p = pos[0] if n else len(order)
                    s = len(order) - p - n
                    how = f"{major}-major" + (" mirrored" if flip_r or flip_c else "") + (
                        f", image level {lv}" if lv else "")
                    return p, s, f"{p}+{height}x{width}+{s} ({how})", flip_r or flip_c
    return None


def _classify_video(order, pos, dims, lv):
    """classify_image for a video: the Voxels must be one T x H x W raster, the axes (t, h, w)
    stored in any order, each possibly mirrored."""
    n = math.prod(dims)
    if len(pos) != n or (n and pos[-1] - pos[0] != n - 1):
        return None
    pixels = [order[i] for i in pos]
    if len(set(pixels)) != n:
        return None
    for storage in itertools.permutations(range(3)):
        for flips in itertools.product((False, True), repeat=3):
            cand = []
            for idx in np.ndindex(*(dims[a] for a in storage)):
                logical = [0, 0, 0]
                for a, x in zip(storage, idx):
                    logical[a] = dims[a] - 1 - x if flips[a] else x
                cand.append(Voxel(*logical, lv))
            if cand == pixels:
                p = pos[0] if n else len(order)
                s = len(order) - p - n
                how = "storage (" + ", ".join("thw"[a] for a in storage) + ")" + (
                    " mirrored " + "".join("thw"[a] for a in range(3) if flips[a]) if any(flips) else "") + (
                    f", video level {lv}" if lv else "")
                return p, s, f"{p}+{'x'.join(map(str, dims))}+{s} (video, {how})", any(flips)
    return None


# --- the model -------------------------------------------------------------------------------------
def _tokenize(x: torch.Tensor, how: str) -> torch.Tensor:
    B, C, H, W = x.shape
    if how == "nchw":
        return x.flatten(2).transpose(1, 2)
    if how == "nchw_T":
        return x.transpose(2, 3).flatten(2).transpose(1, 2)
    if how == "nhwc":
        return x.permute(0, 2, 3, 1).reshape(B, H * W, C)
    if how == "nhwc_T":
        return x.permute(0, 3, 2, 1).reshape(B, W * H, C)
    if how == "nhwc_flat":
        return x.permute(0, 2, 3, 1).flatten(1, 2)
    if how == "mirror":
        return x.flip(3).flatten(2).transpose(1, 2)
    raise ValueError(how)


def _tokenized_order(how: str, height: int, width: int) -> list:
    if how in ("nchw", "nhwc", "nhwc_flat"):
        return [(r, c) for r in range(height) for c in range(width)]
    if how in ("nchw_T", "nhwc_T"):
        return [(r, c) for c in range(width) for r in range(height)]
    if how == "mirror":
        return [(r, width - 1 - c) for r in range(height) for c in range(width)]
    raise ValueError(how)


def _tokenize_video(y: torch.Tensor, how: str) -> torch.Tensor:
    """VIDEO_TOKENIZERS: (B, C, T, H, W) -> (B, L, C)."""
    B, C, T, H, W = y.shape
    if how == "v_nchw":
        return y.flatten(2).transpose(1, 2)
    if how == "v_nhwc":
        return y.permute(0, 2, 3, 4, 1).reshape(B, T * H * W, C)
    if how == "v_nhwc_flat":
        return y.permute(0, 2, 3, 4, 1).flatten(1, 3)
    if how == "v_cols":
        return y.permute(0, 2, 4, 3, 1).reshape(B, T * W * H, C)
    if how == "v_th":
        return y.transpose(2, 3).flatten(2).transpose(1, 2)
    if how == "v_rev":
        return y.permute(0, 4, 3, 2, 1).reshape(B, W * H * T, C)
    if how == "v_mirror":
        return y.flip(2).flatten(2).transpose(1, 2)
    if how == "v_scramble":
        return y.permute(0, 2, 3, 4, 1).reshape(B, H, T, W, C).permute(0, 2, 1, 3, 4).reshape(B, T * H * W, C)
    raise ValueError(how)


def video_tokens(y: torch.Tensor, embed: str, tokenizer: str, batch: int) -> torch.Tensor:
    """A video embedding's output -> (B, T*H*W, C) tokens: ``y`` is (B, C, T, H, W) for the Conv3d
    embeddings and (B*T, C, H, W) frames for frames_conv2d."""
    if embed == "conv3d_video":
        return _tokenize_video(y, tokenizer)
    if embed == "conv3d_frames_merged":  # frames folded into the batch, tokens per frame, merged back
        B, C, T, H, W = y.shape
        return _tokenize(y.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W), tokenizer).reshape(B, T * H * W, C)
    if embed == "frames_conv2d":  # CogVideoX
        BT, C, H, W = y.shape
        return _tokenize(y, tokenizer).view(batch, BT // batch, H * W, C).flatten(1, 2)
    raise ValueError(embed)


def traced_order(embed: str, tokenizer: str, dims: tuple, channels: int = 4) -> list:
    """The original token at each position after ``video_tokens``: run it on a tensor of ids (2
    clips, ``channels`` features; every entry names its clip, feature and (t, r, c)) and read each
    position back. A position that does not hold one token's features in order is a mixed token."""
    T, H, W = dims
    B = 2
    ids = torch.arange(B * channels * T * H * W, dtype=torch.float64).view(B, channels, T, H, W)
    if embed == "frames_conv2d":
        ids = ids.permute(0, 2, 1, 3, 4).reshape(B * T, channels, H, W)
    out = video_tokens(ids, embed, tokenizer, B)
    order = []
    for i in range(out.shape[1]):
        toks = set()
        for b in range(B):
            for ch in range(channels):
                n = int(out[b, i, ch])
                n, c = divmod(n, W)
                n, r = divmod(n, H)
                n, t = divmod(n, T)
                bb, cc = divmod(n, channels)
                toks.add((t, r, c) if (bb, cc) == (b, ch) else None)
        order.append(Voxel(*toks.pop()) if len(toks) == 1 and None not in toks else ("m", i))
    return order


class TokenOp(nn.Module):
    """One op on the (B, L, C) token stream; ``order_after`` says where the tokens went."""

    def __init__(self, name: str, param: int, order: list, extra_id: list, levels: dict, roots: dict | None = None):
        super().__init__()
        roots = {} if roots is None else roots
        self.name = name
        span = image_span(order, levels)
        self.start, level = span if span else (0, None)
        self.hw = levels[level] if level is not None else None  # (H, W), or (T, H, W) of a video
        video = len(levels[0]) == 3
        # a conv over the image's tokens reshaped to their image is that image again (a conv
        # projection, or a reduction: a level of the same root) only when they were in raster order;
        # reshaping reordered tokens makes a different image (a root of its own)
        in_raster = level is not None and order[self.start:self.start + math.prod(self.hw)] == _raster(self.hw, level)
        self.out_level = level
        if name == "conv_roundtrip" and level is not None and not in_raster:
            self.out_level = max(levels) + 1
            levels[self.out_level], roots[self.out_level] = self.hw, self.out_level
        rng = random.Random(param)
        L = len(order)
        self.shift = 0
        if name == "ln":
            self.norm = nn.LayerNorm(DIM)
        elif name == "linear":
            self.fc = nn.Linear(DIM, DIM)
        elif name == "pos":
            self.pos = nn.Parameter(torch.randn(1, L, DIM) * 0.5)
        elif name == "channel_slice":
            self.fc = nn.Linear(DIM, 2 * DIM)
        elif name == "conv_roundtrip":
            self.active = level is not None
            self.conv = (nn.Conv3d if video else nn.Conv2d)(DIM, DIM, 3, padding=1, groups=DIM)
        elif name == "sr_conv" and video:  # the video twin: rows and columns halved, frames maybe
            kt = 2 if rng.random() < 0.5 and self.hw is not None and self.hw[0] >= 2 else 1
            self.active = level is not None and min(self.hw[1:]) >= 2
            self.conv = nn.Conv3d(DIM, DIM, (kt, 2, 2), (kt, 2, 2))
            if self.active:
                self.level = max(levels) + 1
                self.new_hw = levels[self.level] = (self.hw[0] // kt, self.hw[1] // 2, self.hw[2] // 2)
                roots[self.level] = roots.get(level, 0) if in_raster else self.level
        elif name == "sr_conv":
            self.active = level is not None and min(self.hw) >= 2
            self.conv = nn.Conv2d(DIM, DIM, 2, 2)
            if self.active:
                self.level = max(levels) + 1
                self.new_hw = levels[self.level] = (self.hw[0] // 2, self.hw[1] // 2)
                roots[self.level] = roots.get(level, 0) if in_raster else self.level
        elif name in ("add_prefix", "add_suffix"):
            self.token = nn.Parameter(torch.randn(1, 1, DIM))
        elif name in ("roll", "inplace_roll"):
            choices = [s for s in {1, -1, 2, rng.randrange(1, max(2, L))} if L > 1 and s % L]
            self.shift = rng.choice(choices) if choices else 1
        elif name in ("gather", "index_select", "index_copy"):
            perm = list(range(L))
            while L > 1 and perm == list(range(L)):
                rng.shuffle(perm)
            self.register_buffer("perm", torch.tensor(perm, dtype=torch.long))
        self.order_after = self._order(order, extra_id)

    def _order(self, order, extra_id):
        n = self.name
        if n == "mix_reshape":
            return [("m", i) for i in range(len(order))]
        if n == "conv_roundtrip" and self.active:
            n_img = math.prod(self.hw)
            return order[:self.start] + _raster(self.hw, self.out_level) + order[self.start + n_img:]
        if n == "sr_conv" and self.active:
            n_img = math.prod(self.hw)
            return order[:self.start] + _raster(self.new_hw, self.level) + order[self.start + n_img:]
        if n == "dup_tokens":
            return list(order) + list(order)
        if n in ("roll", "inplace_roll"):
            L = len(order)
            return [order[(i - self.shift) % L] for i in range(L)]
        if n in ("gather", "index_select"):
            return [order[i] for i in self.perm.tolist()]
        if n == "index_copy":
            new = list(order)
            for i, p in enumerate(self.perm.tolist()):
                new[p] = order[i]
            return new
        if n == "flip":
            return order[::-1]
        if n == "drop_front":
            k = 0
            while k < len(order) and not _is_pixel(order[k]):
                k += 1
            self.drop = k
            return order[k:]
        if n in ("add_prefix", "add_suffix"):
            extra_id[0] += 1
            tok = ("e", extra_id[0])
            return [tok] + order if n == "add_prefix" else order + [tok]
        return list(order)

    def forward(self, x):  # noqa: C901 - the fuzzer's model: one branch per generated op
        n = self.name
        B, L, C = x.shape
        if n == "ln":
            return self.norm(x)
        if n in ("linear",):
            return self.fc(x)
        if n == "gelu":
            return F.gelu(x)
        if n == "affine":
            return x * 0.5 + 0.25
        if n == "pos":
            return x + self.pos
        if n == "view_split":
            return x.view(B, L, 2, C // 2).flatten(2)
        if n == "transpose_rt":
            return (x.transpose(1, 2) * 1.5).transpose(1, 2)
        if n == "channel_slice":
            return self.fc(x)[..., :C]
        if n == "append_slice":
            return torch.cat([x, x[:, :2] * 0.5], dim=1)[:, :L]
        if n == "drop_front":
            return x[:, self.drop:]
        if n == "add_prefix":
            return torch.cat([self.token.expand(B, -1, -1), x], dim=1)
        if n == "add_suffix":
            return torch.cat([x, self.token.expand(B, -1, -1)], dim=1)
        if n == "roll":
            return torch.roll(x, self.shift, dims=1)
        if n == "gather":
            return x[:, self.perm]
        if n == "index_select":
            return torch.index_select(x, 1, self.perm)
        if n == "flip":
            return x.flip(1)
        if n == "inplace_roll":
            x = x * 1.0  # a fresh tensor of our own, then reorder it in place
            x.copy_(torch.roll(x, self.shift, dims=1))
            return x
        if n == "index_copy":
            x = x * 1.0
            return x.index_copy_(1, self.perm, x.clone())
        if n == "batch_flip":
            return x.flip(0)
        if n == "channel_flip":
            return x.flip(-1)
        if n == "cumsum":
            return x.cumsum(1) / L
        if n == "mix_reshape":  # (B, C, L) read as (B, L, C): every position mixes several tokens
            return x.transpose(1, 2).reshape(B, L, C)
        if n == "dup_tokens":
            return torch.cat([x, x], dim=1)
        if n in ("conv_roundtrip", "sr_conv"):
            if not self.active:
                return x
            p, n_img = self.start, math.prod(self.hw)
            img = x[:, p:p + n_img]
            y = self.conv(img.transpose(1, 2).reshape(B, C, *self.hw)).flatten(2).transpose(1, 2)
            return torch.cat([x[:, :p], y, x[:, p + n_img:]], dim=1) if n_img != L else y
        raise ValueError(n)


class FuzzAttention(nn.Module):
    def __init__(self, blk: BlockSpec, lq: int, lk: int, batch: int, truth_mask: torch.Tensor | None,
                 gen: torch.Generator, kv_ops: nn.ModuleList):
        super().__init__()
        self.kv_ops = kv_ops
        self.form, self.cross, self.heads, self.kernel = blk.form, blk.cross, blk.heads, blk.kernel
        self.d = DIM // blk.heads
        self.kv_heads = (blk.heads // 2 if blk.form in ("sdpa_gqa", "op_flash_gqa")
                         else 1 if blk.form in ("sdpa_mqa", "m_mqa", "op_flash_mqa") else blk.heads)
        self.norm = nn.LayerNorm(DIM)
        self.oracle = None
        if blk.form.startswith("mha"):
            self.batch_first = blk.form == "mha_batch_first"
            self.mha = nn.MultiheadAttention(DIM, blk.heads, batch_first=self.batch_first)
        else:
            self.q = nn.Linear(DIM, DIM)
            self.kv = nn.Linear(DIM, 2 * self.kv_heads * self.d)
            self.proj = nn.Linear(DIM, DIM)
        if blk.form == "m_tensor_scale":  # Swin-V2 style learned per-head logit scale
            self.logit_scale = nn.Parameter(torch.log(1 + 9 * torch.rand(blk.heads, 1, 1, generator=gen)))
        self.mask_kind = blk.mask.split(":")[0]
        self.register_buffer("mask", None if blk.mask == "none" else
                             _make_mask(blk.mask, lq, lk, batch, blk.heads, truth_mask, gen))

    # the oracle path: add log M (eager only)
    def _o(self, scores):
        return scores if self.oracle is None else scores + self.oracle.to(scores.dtype)

    def _sdpa_mask(self):
        if self.oracle is None:
            return self.mask
        m = as_additive(self.mask, self.oracle.dtype) if self.mask is not None else None
        return self.oracle if m is None else m + self.oracle

    def _mask_scores(self, s):
        if self.mask is None:
            return s
        if self.mask_kind == "bool":
            return s.masked_fill(~self.mask, float("-inf"))
        return s + self.mask

    def forward(self, x):
        h = self.norm(x)
        if self.cross:
            x, _ = x.chunk(2, 0)
            hq, hkv = h.chunk(2, 0)
        else:
            hq = hkv = h
        for op in self.kv_ops:
            hkv = op(hkv)
        if self.form.startswith("mha"):
            return x + self._mha(hq, hkv)
        B, Lq, C = hq.shape
        Lk = hkv.shape[1]
        q = self.q(hq).view(B, Lq, self.heads, self.d).transpose(1, 2)
        k, v = self.kv(hkv).view(B, Lk, 2, self.kv_heads, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        o = getattr(self, "_" + self.form)(q, k, v)
        return x + self.proj(o.transpose(1, 2).reshape(B, Lq, C))

    def _mha(self, hq, hkv):
        mask = self.mask
        if self.oracle is not None:
            oracle = self.oracle
            if oracle.dim() == 3:   # per head: MHA's 3-D mask is (batch * heads, Lq, Lk), batch-major
                oracle = oracle.repeat(hq.shape[0 if self.batch_first else 1], 1, 1)
            mask = oracle if mask is None else mask + oracle
        if not self.batch_first:
            hq, hkv = hq.transpose(0, 1), hkv.transpose(0, 1)
        out, _ = self.mha(hq, hkv, hkv, need_weights=False, attn_mask=mask)
        return out if self.batch_first else out.transpose(0, 1)

    # --- SDPA forms
    def _sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._sdpa_mask())

    def _sdpa_scale(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._sdpa_mask(), scale=0.3)

    def _sdpa_gqa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._sdpa_mask(), enable_gqa=True)

    def _sdpa_causal(self, q, k, v):  # never a grid site: the oracle path is plain attention
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def _sdpa_mqa(self, q, k, v):  # k, v: (B, 1, L, d), broadcast over the query heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._sdpa_mask())

    # --- attention kernels called as ops, on (B, L, H, D) tensors (no mask: the oracle path is SDPA);
    # flash-attn pairs query and key/value heads by their counts (GQA / MQA)
    def _op_flash(self, q, k, v, causal=False, scale=None):
        scale = self.d ** -0.5 if scale is None else scale
        if self.oracle is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.oracle.to(q.dtype), scale=scale,
                                                  enable_gqa=k.shape[1] != q.shape[1])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        b, n = q.shape[:2]
        if self.kernel == "fa3":
            out = torch.ops.flash_attn_3._flash_attn_forward(q, k, v, softmax_scale=scale, causal=causal)[0]
        elif self.kernel == "xformers":
            out = torch.ops.xformers_flash.flash_fwd(q, k, v, None, None, None, n, k.shape[1], 0.0, scale, causal,
                                                     -1, -1, False, None)[0]
        elif self.kernel == "varlen" and k.shape[1] == n:
            cu = torch.arange(0, (b + 1) * n, n, dtype=torch.int32)
            out = torch.ops.flash_attn._flash_attn_varlen_forward(
                q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, n, n, 0.0, scale, causal)[0]
            out = out.view(b, n, *out.shape[1:])
        else:
            out = torch.ops.flash_attn._flash_attn_forward(q, k, v, 0.0, scale, causal, -1, -1, 0.0, None, False)[0]
        return out.transpose(1, 2)

    def _op_flash_scale(self, q, k, v):
        return self._op_flash(q, k, v, scale=0.3)

    _op_flash_gqa = _op_flash
    _op_flash_mqa = _op_flash

    def _op_flash_causal(self, q, k, v):  # never a grid site: the oracle path is plain attention
        if self.oracle is not None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._op_flash(q, k, v, causal=True)

    # --- manual chains, one spelling each
    def _m_qscale(self, q, k, v):  # timm: scale q first
        attn = (q * self.d ** -0.5) @ k.transpose(-2, -1)
        return self._o(self._mask_scores(attn)).softmax(dim=-1) @ v

    def _m_scores_scale(self, q, k, v):
        attn = torch.matmul(q, k.transpose(-1, -2)) * self.d ** -0.5
        return F.softmax(self._o(self._mask_scores(attn)), dim=-1) @ v

    def _m_div_sqrt(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) / math.sqrt(self.d)
        return torch.softmax(self._o(self._mask_scores(attn)), -1) @ v

    def _m_mT(self, q, k, v):
        attn = q @ k.mT * 0.3
        return torch.matmul(self._o(self._mask_scores(attn)).softmax(-1), v)

    def _m_mqa(self, q, k, v):  # k, v with one head, broadcast by the matmuls
        attn = (q @ k.transpose(-2, -1)) * self.d ** -0.5
        return self._o(self._mask_scores(attn)).softmax(-1) @ v

    def _fold(self, q, k, v):
        B, H, Lq, D = q.shape
        return B, H, Lq, D, q.reshape(B * H, Lq, D), k.reshape(B * H, -1, D), v.reshape(B * H, -1, D)

    def _folded_bias(self, B, H, Lq, Lk, dtype):
        """The mask as a (B*H, Lq, Lk) additive bias, as diffusers' prepare_attention_mask makes it."""
        if self.mask is None:
            return None
        bias = as_additive(self.mask, dtype) if self.mask_kind == "bool" else self.mask
        return bias.expand(B, H, Lq, Lk).reshape(B * H, Lq, Lk)

    def _m_baddbmm(self, q, k, v):  # diffusers AttnProcessor: heads folded into the batch
        B, H, Lq, D, q3, k3, v3 = self._fold(q, k, v)
        Lk = k3.shape[1]
        bias = self._folded_bias(B, H, Lq, Lk, q.dtype)
        if bias is not None:
            scores = torch.baddbmm(bias, q3, k3.transpose(-1, -2), beta=1, alpha=D ** -0.5)
        else:
            empty = torch.empty(B * H, Lq, Lk, dtype=q.dtype, device=q.device)
            scores = torch.baddbmm(empty, q3, k3.transpose(-1, -2), beta=0, alpha=D ** -0.5)
        probs = self._o(scores).softmax(dim=-1)
        return torch.bmm(probs, v3).reshape(B, H, Lq, D)

    def _m_bmm(self, q, k, v):
        B, H, Lq, D, q3, k3, v3 = self._fold(q, k, v)
        scores = torch.bmm(q3, k3.transpose(1, 2)) * D ** -0.5
        bias = self._folded_bias(B, H, Lq, k3.shape[1], q.dtype)
        if bias is not None:
            scores = scores + bias
        return torch.bmm(self._o(scores).softmax(-1), v3).reshape(B, H, Lq, D)

    def _m_einsum(self, q, k, v):
        attn = torch.einsum("bhid,bhjd->bhij", q, k) * self.d ** -0.5
        return torch.einsum("bhij,bhjd->bhid", self._o(self._mask_scores(attn)).softmax(-1), v)

    def _m_tensor_scale(self, q, k, v):  # Swin-V2 cosine attention with a learned logit scale
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * scale
        return self._o(self._mask_scores(attn)).softmax(-1) @ v

    def _m_v_attnT(self, q, k, v):  # CoAtNet/MaxxViT Attention2d: tensors are (B, H, d, L)
        qt, kt, vt = q.transpose(-2, -1), k.transpose(-2, -1), v.transpose(-2, -1)
        attn = (qt.transpose(-2, -1) @ kt) * self.d ** -0.5
        attn = self._o(self._mask_scores(attn)).softmax(dim=-1)
        return (vt @ attn.transpose(-2, -1)).transpose(-2, -1)


def _make_mask(kind: str, lq, lk, batch, heads, truth_mask, gen):
    """A mask of a broadcast shape. Bool masks hide few keys and never a whole row, also together
    with the true grid mask (a fully hidden row would make both sides NaN: no teeth)."""
    mtype, shape = kind.split(":")
    dims = {"LL": (lq, lk), "11LL": (1, 1, lq, lk), "1HLL": (1, heads, lq, lk),
            "B11L": (batch, 1, 1, lk), "B1LL": (batch, 1, lq, lk), "1L": (1, lk), "H1L": (heads, 1, lk)}[shape]
    if mtype == "add":
        return torch.randn(dims, generator=gen) * 0.7
    keep = torch.rand(dims, generator=gen) > 0.15
    full = keep.expand(*keep.shape[:-2], lq, lk) if keep.dim() > 1 else keep.expand(lq, lk)
    allowed = torch.ones(lq, lk, dtype=torch.bool) if truth_mask is None else truth_mask
    if bool(((full & allowed).sum(-1) == 0).any()):
        keep = torch.ones(dims, dtype=torch.bool)
    return keep


class FuzzModel(nn.Module):
    def __init__(self, spec: Spec, truths: list):
        super().__init__()
        self.spec = spec
        self.breaking = False  # the compiled check sets it: rewrite() captures one whole graph
        p = spec.patch
        if spec.frames:
            pt = spec.tpatch
            self.embed = (nn.Conv2d(3, DIM, p, p) if spec.embed == "frames_conv2d"
                          else nn.Conv3d(3, DIM, (pt, p, p), (pt, p, p)))
        else:
            self.embed = nn.Conv2d(3, DIM, p, p) if spec.embed == "conv2d" else nn.Conv3d(3, DIM, (1, p, p), (1, p, p))
        self.prefix_tokens = nn.Parameter(torch.randn(1, spec.prefix, DIM)) if spec.prefix else None
        self.suffix_tokens = nn.Parameter(torch.randn(1, spec.suffix, DIM)) if spec.suffix else None
        self.stages = nn.ModuleList()
        self.norm = nn.LayerNorm(DIM)
        gen = torch.Generator().manual_seed(spec.seed)
        image = (traced_order(spec.embed, spec.tokenizer, spec.video_shape) if spec.frames
                 else _tokenized_order(spec.tokenizer, spec.height, spec.width))
        order = [("p", i) for i in range(spec.prefix)] + image + [("s", i) for i in range(spec.suffix)]
        path_ops = (("tokenize", spec.tokenizer),) + ((("cat", "prefix/suffix"),) if spec.prefix or spec.suffix else ())
        extra_id = [0]
        levels = {0: spec.video_shape}  # image (or video) sizes by level (reductions, new images)
        roots = {0: 0}  # level -> the level of the image it is (a reduction of)
        batch = spec.batch * (2 if any(b.cross for b in spec.blocks) else 1)
        for i, blk in enumerate(spec.blocks):
            stage = nn.Module()
            stage.ops = nn.ModuleList()
            for name, param in blk.ops:
                op = TokenOp(name, param, order, extra_id, levels, roots)
                stage.ops.append(op)
                order = op.order_after
                path_ops += ((name, param),)
            k_order = list(order)
            kv_ops = nn.ModuleList()
            for name, param in blk.kv_ops:
                op = TokenOp(name, param, k_order, extra_id, levels, roots)
                kv_ops.append(op)
                k_order = op.order_after
            q_batch = batch // 2 if blk.cross else batch
            # keys of a batch-reordered copy: query image b meets key image B-1-b
            kv_batch_flipped = sum(n == "batch_flip" for n, _ in blk.kv_ops) % 2 == 1 and q_batch > 1
            truth = SiteTruth(path=f"stages.{i}.attn", block=i, spec=blk, q_order=list(order),
                              k_order=k_order, cross=blk.cross or kv_batch_flipped,
                              q_image=classify_image(order, levels),
                              k_image=classify_image(k_order, levels),
                              ops_before=path_ops, kv_ops=tuple(blk.kv_ops), batch=q_batch,
                              levels=levels, roots=roots, grouping=spec.grouping)
            truth_mask = None
            if truth.is_image_self_attention:
                truth_mask = torch.isfinite(truth.log_mask(spec.stride, torch.float64))
                if truth_mask.dim() == 3:   # per head: keys kept in every head
                    truth_mask = truth_mask.all(0)
            stage.attn = FuzzAttention(blk, len(order), len(k_order), q_batch, truth_mask, gen, kv_ops)
            self.stages.append(stage)
            truths.append(truth)
            batch = q_batch

    def _embed(self, img):
        if self.spec.embed == "conv2d":
            return self.embed(img)
        if self.spec.embed == "conv3d_t1":
            return self.embed(img.unsqueeze(2)).flatten(2, 3)
        clip = self.embed(img.transpose(0, 1).unsqueeze(0))  # (1, C, B, h, w): the batch as frames
        return clip.permute(0, 2, 1, 3, 4).flatten(0, 1)

    def _tokens(self, img):
        spec = self.spec
        if not spec.frames:
            return _tokenize(self._embed(img), spec.tokenizer)
        if spec.embed == "frames_conv2d":  # (B, 3, T, h, w) clip -> (B*T, 3, h, w) frames
            B, C3, T, h, w = img.shape
            return video_tokens(self.embed(img.permute(0, 2, 1, 3, 4).reshape(B * T, C3, h, w)),
                                spec.embed, spec.tokenizer, B)
        return video_tokens(self.embed(img), spec.embed, spec.tokenizer, img.shape[0])

    def forward(self, img):
        x = self._tokens(img)
        B = x.shape[0]
        parts = [x]
        if self.prefix_tokens is not None:
            parts.insert(0, self.prefix_tokens.expand(B, -1, -1))
        if self.suffix_tokens is not None:
            parts.append(self.suffix_tokens.expand(B, -1, -1))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else x
        outs = []
        if self.breaking:  # straight-line code: Dynamo resumes after a top-level break, not in a loop
            assert len(self.stages) <= 3, "the generator draws at most three stages"
            breaks, n = self.spec.breaks, len(self.stages)
            if 0 in breaks:
                torch._dynamo.graph_break()
            x = self._stage(self.stages[0], x)
            outs.append(x)
            if n > 1 and 1 in breaks:
                torch._dynamo.graph_break()
            if n > 1:
                x = self._stage(self.stages[1], x)
                outs.append(x)
            if n > 2 and 2 in breaks:
                torch._dynamo.graph_break()
            if n > 2:
                x = self._stage(self.stages[2], x)
                outs.append(x)
        else:
            for stage in self.stages:
                x = self._stage(stage, x)
                outs.append(x)
        if self.spec.outputs == "all":
            return tuple(outs[:-1]) + (self.norm(x),)
        return self.norm(x)


    def _stage(self, stage, x):
        for op in stage.ops:
            x = op(x)
        return stage.attn(x)


DTYPES = {"float64": torch.float64, "float32": torch.float32}


def build(spec: Spec):
    """(model, inputs, truths): an eval-mode model in the spec's dtype, its input, one SiteTruth
    per attention module (in module order)."""
    torch.manual_seed(spec.seed)
    truths: list[SiteTruth] = []
    model = FuzzModel(spec, truths).to(DTYPES[spec.dtype]).eval()
    batch = spec.batch * (2 if any(b.cross for b in spec.blocks) else 1)
    gen = torch.Generator().manual_seed(spec.seed + 1)
    clip = (spec.frames * spec.tpatch,) if spec.frames else ()  # a video: (B, 3, T*pt, H*p, W*p)
    img = torch.randn(batch, 3, *clip, spec.height * spec.patch, spec.width * spec.patch, generator=gen,
                      dtype=torch.float64).to(DTYPES[spec.dtype])
    return model, (img,), truths


def set_oracle(model: nn.Module, truths, stride, sites) -> None:
    """Switch the attention modules of ``sites`` (block indices) to their true-layout oracle;
    every other module computes its plain attention."""
    dtype = next(model.parameters()).dtype
    for t in truths:
        mod = model.get_submodule(t.path)
        mod.oracle = t.log_mask(stride, dtype) if t.block in sites else None
