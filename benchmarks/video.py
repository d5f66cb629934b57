"""Video cases (``python -m benchmarks --cases video``): grid attention over ``T x H x W`` tokens.

* ``video-block``: one video-DiT self-attention block over ``T x H x W`` latents (default 8x32x32 =
  8192 tokens): ``x + dwconv3d(x)`` (a depthwise 3x3x3 positional conv, the spatial source the
  layout proof starts from) -> tokens (frames slowest) -> LayerNorm -> qkv Linear -> SDPA -> proj
  Linear -> residual. Configurations, side by side: eager and inductor (dense); the ``gridattn``
  backend at stride 2 (= ``(1, 2, 2)``: every group spans all frames) and ``(2, 2, 2)``, with grid
  grouping and with window grouping (contiguous tiles) at the same strides, so the same number of
  groups and the same attention FLOPs; the same groupings written by hand (``eager-grid``,
  ``eager-window``: view/permute into groups folded into the batch, plain SDPA, permute back: the
  reference every grouped configuration's ``max|diff|`` is taken against); the package's own
  ``gridattn_fx.grid.grouped_attention`` called eagerly on the video layout (``eager
  gridattn_fx.grid``: the regrouping code the rewrite inserts); and FlexAttention
  (compiled by inductor) with the same block masks, on group-major tokens (block-diagonal mask,
  empty blocks skipped) and on raster tokens (mask ``group(q) == group(k)``).
* ``wan``: diffusers' ``WanTransformer3DModel`` (the zoo's small widths, 2 layers) on latents
  giving 8x32x32 tokens, end to end: eager, inductor, gridattn stride 2 and (2, 2, 2).

A gridattn configuration whose options the installed gridattn_fx rejects (a 3-tuple stride or
``grouping`` before they exist) is left out with a message; the ``sites`` column says how many
attention sites each gridattn configuration rewrote.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .cases import CPU, Config, run_case


def stride3(stride) -> tuple[int, int, int]:
    """A user stride on a video layout (docs/design.md section 1): G -> (1, G, G), (Gh, Gw) -> (1, Gh, Gw)."""
    if isinstance(stride, int):
        return (1, stride, stride)
    return (1, *stride) if len(stride) == 2 else tuple(stride)


def stride_label(stride) -> str:
    return f"s{stride}" if isinstance(stride, int) else "s" + "x".join(str(g) for g in stride)


class VideoAttentionBlock(nn.Module):
    """Self-attention over all ``T*H*W`` tokens of a video latent, with its projections."""

    def __init__(self, heads: int = 2, head_dim: int = 32):
        super().__init__()
        dim = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.pos = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def channels(self) -> int:
        return self.heads * self.head_dim

    def forward(self, x):  # (B, C, T, H, W) -> (B, T*H*W, C)
        x = x + self.pos(x)
        b, c, t, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        qkv = self.qkv(self.norm(tokens)).reshape(b, t * h * w, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = self.attend(q, k, v, (t, h, w))
        return tokens + self.proj(o.transpose(1, 2).reshape(b, t * h * w, c))

    def attend(self, q, k, v, shape):
        return F.scaled_dot_product_attention(q, k, v)


def group_tokens(x, shape, stride, grouping: str):
    """(B, heads, T*H*W, d) raster tokens -> (B*groups, heads, n, d), group-major, written by hand.

    grid: token (t, r, c) joins group (t % Gt, r % Gh, c % Gw); window: (t // tT, r // tH, c // tW)
    with tiles tX = ceil(X / GX) (the sides here are multiples of the stride)."""
    b, heads, _, d = x.shape
    (t, h, w), (gt, gh, gw) = shape, stride
    if grouping == "grid":  # axis x = (x // G) * G + x % G: the group index is the inner factor
        x = x.reshape(b, heads, t // gt, gt, h // gh, gh, w // gw, gw, d).permute(0, 3, 5, 7, 1, 2, 4, 6, 8)
    else:  # window: axis x = (x // tile) * tile + x % tile: the group index is the outer factor
        x = x.reshape(b, heads, gt, t // gt, gh, h // gh, gw, w // gw, d).permute(0, 2, 4, 6, 1, 3, 5, 7, 8)
    return x.reshape(b * gt * gh * gw, heads, (t // gt) * (h // gh) * (w // gw), d)


def ungroup_tokens(x, b, shape, stride, grouping: str):
    """Inverse of :func:`group_tokens`."""
    _, heads, _, d = x.shape
    (t, h, w), (gt, gh, gw) = shape, stride
    x = x.reshape(b, gt, gh, gw, heads, t // gt, h // gh, w // gw, d)
    if grouping == "grid":
        x = x.permute(0, 4, 5, 1, 6, 2, 7, 3, 8)
    else:
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7, 8)
    return x.reshape(b, heads, t * h * w, d)


class EagerVideoGroupedBlock(VideoAttentionBlock):
    """The block with grouped attention written by hand (grid or window grouping)."""

    def __init__(self, heads, head_dim, stride, grouping: str):
        super().__init__(heads, head_dim)
        self.stride, self.grouping = stride3(stride), grouping

    def attend(self, q, k, v, shape):
        g = lambda x: group_tokens(x, shape, self.stride, self.grouping)  # noqa: E731
        o = F.scaled_dot_product_attention(g(q), g(k), g(v))
        return ungroup_tokens(o, q.shape[0], shape, self.stride, self.grouping)


class PackageGroupedBlock(VideoAttentionBlock):
    """The block with ``gridattn_fx.grid.grouped_attention`` called eagerly on a ``T x H x W``
    layout: the package's own regrouping functions, the code the rewrite inserts into graphs."""

    def __init__(self, heads, head_dim, stride, grouping: str):
        super().__init__(heads, head_dim)
        self.stride, self.grouping = stride, grouping

    def attend(self, q, k, v, shape):
        from gridattn_fx.grid import TokenLayout, grouped_attention

        layout = TokenLayout(0, image_shape=tuple(shape))
        return grouped_attention(q, k, v, q_layout=layout, k_layout=layout, stride=self.stride,
                                 grouping=self.grouping)


class FlexVideoBlock(VideoAttentionBlock):
    """The block with FlexAttention and a block mask of the same grouping.

    ``clustered=True``: tokens permuted group-major first (an index gather), so the mask is
    block-diagonal and FlexAttention skips every block outside the groups; ``clustered=False``:
    raster order, mask ``group(q) == group(k)`` (grid grouping leaves no 128-token block empty;
    window grouping leaves those whose tokens lie in different tiles)."""

    def __init__(self, heads, head_dim, shape, stride, grouping: str, clustered: bool):
        from torch.nn.attention.flex_attention import create_block_mask

        super().__init__(heads, head_dim)
        self.clustered = clustered
        t, h, w = shape
        gt, gh, gw = stride = stride3(stride)
        length, n = t * h * w, (t // gt) * (h // gh) * (w // gw)
        ids = torch.arange(length).view(1, 1, length, 1)
        order = group_tokens(ids, shape, stride, grouping).flatten()
        group_of = torch.empty(length, dtype=torch.long)
        group_of[order] = torch.arange(length) // n   # raster token -> its group
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        if clustered:
            def mask_mod(b, hd, q_idx, kv_idx):
                return (q_idx // n) == (kv_idx // n)
        else:
            def mask_mod(b, hd, q_idx, kv_idx):
                return group_of[q_idx] == group_of[kv_idx]
        self.block_mask = create_block_mask(mask_mod, None, None, length, length, device="cpu")

    def attention_density(self) -> float:
        """Fraction of (query block, key block) pairs the block mask computes."""
        return 1.0 - float(self.block_mask.sparsity()) / 100.0

    def attend(self, q, k, v, shape):
        from torch.nn.attention.flex_attention import flex_attention

        if not self.clustered:
            return flex_attention(q, k, v, block_mask=self.block_mask)
        o = flex_attention(q.index_select(2, self.order), k.index_select(2, self.order),
                           v.index_select(2, self.order), block_mask=self.block_mask)
        return o.index_select(2, self.inverse)


def _gridattn_configs(model, strides, groupings, references, echo) -> list[Config]:
    """gridattn configurations whose options the installed gridattn_fx accepts."""
    from gridattn_fx import GridAttnConfig

    configs = []
    for grouping in groupings:
        for stride in strides:
            options = {"stride": stride, "min_image_tokens": 0}
            if grouping != "grid":
                options["grouping"] = grouping
            name = f"gridattn {stride_label(stride)}" + ("" if grouping == "grid" else f" {grouping}")
            try:
                GridAttnConfig.from_options(options)
            except (ValueError, TypeError) as exc:
                echo(f"  {name}: left out, the installed gridattn_fx rejects {options}: {exc}")
                continue
            configs.append(Config(name, "gridattn", model, options,
                                  reference=references.get((grouping, stride3(stride)))))
    return configs


def video_block_case(shape=(8, 32, 32), *, heads=2, head_dim=32, runs, warmup, echo=print, memory=True,
                     target=CPU):
    t, h, w = shape
    size = f"{t}x{h}x{w}"
    strides = (2, (2, 2, 2))
    torch.manual_seed(0)
    block = VideoAttentionBlock(heads, head_dim).eval()
    x = torch.randn(1, block.channels(), t, h, w)
    configs = [Config("eager", "eager", block), Config("inductor", "inductor", block)]
    references = {}
    for grouping in ("grid", "window"):
        for stride in strides:
            eager = EagerVideoGroupedBlock(heads, head_dim, stride, grouping).eval()
            eager.load_state_dict(block.state_dict())
            name = f"eager-{grouping} {stride_label(stride)}"
            references[(grouping, stride3(stride))] = name
            configs.append(Config(name, "eager-grid", eager, reference=name))
    configs += _gridattn_configs(block, strides, ("grid", "window"), references, echo)
    for grouping in ("grid", "window"):
        for stride in strides:
            package = PackageGroupedBlock(heads, head_dim, stride, grouping).eval()
            package.load_state_dict(block.state_dict())
            configs.append(Config(f"eager gridattn_fx.grid {grouping} {stride_label(stride)}", "eager-grid", package,
                                  reference=references[(grouping, stride3(stride))]))
    dense = 2 * heads * (t * h * w) ** 2 * 2 * head_dim
    for grouping in ("grid", "window"):
        for stride in strides:
            for clustered in (True, False):
                if grouping == "window" and clustered and stride != strides[0]:
                    continue  # one clustered window row is enough: clustered flex is grouping-blind
                flex = FlexVideoBlock(heads, head_dim, shape, stride, grouping, clustered).eval()
                flex.load_state_dict(block.state_dict())
                name = f"flex-{grouping}{'' if clustered else '-raster'} {stride_label(stride)}"
                configs.append(Config(name, "flex", flex, reference=references[(grouping, stride3(stride))],
                                      flops=_flex_flops(block, flex, x, dense)))
    echo(f"[video-block {size}] width {heads * head_dim} ({heads} heads x {head_dim}), {t * h * w} tokens")
    return run_case("video-block", size, configs, (x,), runs=runs, warmup=warmup, echo=echo, memory=memory,
                    target=target)


def _flex_flops(block, flex, x, dense):
    def f():
        from gridattn_fx.tools.flops import count_flops

        # the block's dense FLOPs, less the attention FLOPs the block mask skips
        return (count_flops(block, (x,)) - dense * (1 - flex.attention_density())) / 1e9, "block-mask density"
    return f


def wan_case(latents=(8, 64, 64), *, runs, warmup, echo=print, memory=True, target=CPU):
    from gridattn_fx import zoo

    t0 = time.perf_counter()
    model, inputs = zoo.build("diffusers:wan", latents=latents)
    tokens = (latents[0], latents[1] // 2, latents[2] // 2)
    size = "x".join(str(n) for n in tokens) + " tokens"
    echo(f"[wan {size}] diffusers:wan small widths, latents {latents}, built in {time.perf_counter() - t0:.1f} s")
    configs = [Config("eager", "eager", model), Config("inductor", "inductor", model)]
    configs += _gridattn_configs(model, (2, (2, 2, 2)), ("grid",), {}, echo)
    return run_case("wan", size, configs, tuple(inputs), runs=runs, warmup=warmup, echo=echo, memory=memory,
                    target=target)


def video_cases(*, quick, runs, warmup, model_runs, model_warmup, echo=print, memory=True, target=CPU):
    shape = (4, 16, 16) if quick else (8, 32, 32)
    rows = video_block_case(shape, runs=runs, warmup=warmup, echo=echo, memory=memory, target=target)
    latents = (4, 32, 32) if quick else (8, 64, 64)
    rows += wan_case(latents, runs=model_runs, warmup=model_warmup, echo=echo, memory=memory, target=target)
    return rows

