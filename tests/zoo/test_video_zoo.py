"""Video transformers of the zoo (diffusers Wan, CogVideoX, LTX-Video, HunyuanVideo; small configs,
random weights, float64), compiled through the gridattn pass against the oracle.

The self-attention sites over video tokens (4x8x8 tokens after patching; text as prefix or suffix
tokens where the attention is joint) must be rewritten and the model's output must equal the same
model computing the oracle at those sites: ``SDPA(Q, K, V, attn_mask = B + log M)`` with ``M``
from tests/oracle.py (docs/design.md section 1), applied by patching
``torch.nn.functional.scaled_dot_product_attention`` while (and only while) one of those modules
runs. Cross-attention to text and the text refiner stay untouched. Stride 1 is the plain model.

The models are compiled with the gridattn pass followed by eager execution of its graph (the
``gridattn`` backend is the same pass followed by inductor; inductor compiles of whole video
transformers take minutes on a small CPU), as in tests/zoo/test_prepare_zoo.py.
"""

from __future__ import annotations

import contextlib
import copy
import re

import pytest
import torch

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig, zoo  # noqa: E402
from gridattn_fx.frontends.backend import apply_pass  # noqa: E402
from gridattn_fx.grid import TokenLayout  # noqa: E402
from oracle import assert_close64, assert_differs, oracle_mask  # noqa: E402
from zoo_required import missing_library  # noqa: E402

VIDEO = (4, 8, 8)   # tokens after patching: frames, rows, columns (the zoo's small configs)
TEXT = 8            # text tokens

# name -> (module-path regex of the video self-attention sites, their layout (queries = keys),
#          number of attention sites in the model)
MODELS = {
    # self-attention over the video tokens; attn2 is cross-attention to text
    "diffusers:wan": (r"^blocks\.\d+\.attn1$", TokenLayout(0, image_shape=VIDEO), 4),
    # joint attention over [text, video]: the text tokens are a prefix
    "diffusers:cogvideox": (r"^transformer_blocks\.\d+\.attn1$", TokenLayout(TEXT, image_shape=VIDEO), 2),
    # dual- and single-stream joint attention over [video, text]: the text tokens are a suffix;
    # the token refiner's self-attention over text stays untouched
    "diffusers:hunyuan-video": (r"^(single_)?transformer_blocks\.\d+\.attn$",
                                TokenLayout(0, image_shape=VIDEO, suffix=TEXT), 3),
    # tokens packed by the pipeline; the rotary table's coordinate grid (a meshgrid of aranges
    # built from num_frames, height, width) places them (layout/positions.py)
    "diffusers:ltx-video": (r"^transformer_blocks\.\d+\.attn1$", TokenLayout(0, image_shape=VIDEO), 4),
}


def _build(name):
    if not zoo.library_available(name):
        missing_library(zoo.entry(name).library)  # fails unless GRIDATTN_SKIP_ZOO=1 (tests/zoo_required.py)
    return zoo.build(name, dtype=torch.float64)


def _sample(out):
    return out.sample if hasattr(out, "sample") else out[0]


def _pass_only(config):
    def gridattn_pass(gm, example_inputs):
        new_gm, _report = apply_pass(gm, example_inputs, config)
        return new_gm.forward
    return gridattn_pass


def _compiled_sites(model, inputs, **options):
    """Output and report lines of the model compiled through the gridattn pass (strict)."""
    config = GridAttnConfig(min_image_tokens=1, strict=True, **options)
    compiled = torch.compile(model, backend=_pass_only(config))
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        out = _sample(compiled(*inputs))
    return out, [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]


@contextlib.contextmanager
def oracle_sites(model, paths, layout, stride, grouping="grid"):
    """While active, each module in ``paths`` computes the oracle at its SDPA call (exactly one per
    forward, over ``layout`` queries and keys); every other SDPA call is left as it is."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    inside, calls = [], {p: 0 for p in paths}

    def masked_sdpa(*args, **kwargs):
        if not inside:
            return sdpa(*args, **kwargs)
        named = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        q, k = named["query"], named["key"]
        assert q.shape[-2] == k.shape[-2] == layout.length, (inside[-1], q.shape, k.shape, layout)
        calls[inside[-1]] += 1
        named["attn_mask"] = oracle_mask(named.get("attn_mask"), layout, layout, stride, q.dtype, q.device,
                                         grouping=grouping)
        return sdpa(**named)

    def enter(path):
        def hook(module, args):
            inside.append(path)
        return hook

    def leave(module, args, output):
        inside.pop()

    modules = dict(model.named_modules())
    handles = []
    for p in paths:
        handles.append(modules[p].register_forward_pre_hook(enter(p)))
        handles.append(modules[p].register_forward_hook(leave))
    torch.nn.functional.scaled_dot_product_attention = masked_sdpa
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()


def _oracle_output(model, inputs, paths, layout, stride, grouping="grid"):
    with oracle_sites(model, paths, layout, stride, grouping) as calls, torch.no_grad():
        out = _sample(model(*inputs))
    assert calls == {p: 1 for p in paths}, calls
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_video_model_builds_and_runs_in_float64(name):
    model, inputs = _build(name)
    with torch.no_grad():
        out = _sample(model(*inputs))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert out.shape == inputs[0].shape  # latents in, latents (noise prediction) out


@pytest.mark.parametrize("grouping", ["grid", "window"])
@pytest.mark.parametrize("stride", [2, (2, 2, 2)], ids=["s2", "s2x2x2"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_video_self_attention_rewritten_against_oracle(name, stride, grouping):
    pattern, layout, n_sites = MODELS[name]
    model, inputs = _build(name)
    ref = copy.deepcopy(model)
    options = {"stride": stride} if grouping == "grid" else {"stride": stride, "grouping": grouping}
    got, sites = _compiled_sites(model, inputs, **options)
    text = "\n".join(f"{s.module_path}: {s.decision} {s.q_layout} {s.reason}" for s in sites)
    assert len(sites) == n_sites, text
    video = [s for s in sites if re.search(pattern, s.module_path)]
    assert video and all(s.decision == "rewritten" for s in video), text
    assert all(s.q_layout == layout and s.k_layout == layout for s in video), text
    assert all(s.decision == "skipped" for s in sites if s not in video), text  # text cross / refiner
    expected = _oracle_output(ref, inputs, [s.module_path for s in video], layout, stride, grouping)
    assert_close64(got, expected)
    with torch.no_grad():
        assert_differs(got, _sample(ref(*inputs)))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_video_stride_one_is_the_plain_model(name):
    model, inputs = _build(name)
    ref = copy.deepcopy(model)
    got, sites = _compiled_sites(model, inputs, stride=1)
    assert sites and all(s.decision == "skipped" for s in sites)
    with torch.no_grad():
        assert torch.equal(got, _sample(ref(*inputs)))


def _ltx_declaration():
    from gridattn_fx import ImageTokens

    return ImageTokens(frames=lambda a: a["num_frames"], height=lambda a: a["height"], width=lambda a: a["width"])


@pytest.mark.parametrize("stride", [2, (2, 2, 2), 1], ids=["s2", "s2x2x2", "s1"])
def test_ltx_declared_video_layout_against_oracle(stride):
    """LTX-Video's tokens are packed by the pipeline: no graph proves them; prepare() with a declared
    video layout (frames, height, width read from the call's arguments) carries it to the blocks."""
    model, inputs = _build("diffusers:ltx-video")
    ref = copy.deepcopy(model)
    gridattn_fx.prepare(model, inputs, hidden_states=_ltx_declaration())
    config = GridAttnConfig(stride=stride, min_image_tokens=1, strict=True)
    model.compile_repeated_blocks(backend=_pass_only(config))
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        got = _sample(model(*inputs))
        plain = _sample(ref(*inputs))
    sites = [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]
    text = "\n".join(f"{s.module_path}: {s.decision} {s.q_layout} {s.reason}" for s in sites)
    if stride == 1:
        assert sites and all(s.decision == "skipped" for s in sites), text
        assert torch.equal(got, plain)
        return
    # Regional graphs: each block's self-attention (attn1) rewritten, its cross-attention to text
    # (attn2) not (paths relative to the block, or named in the whole model).
    layout = TokenLayout(0, image_shape=VIDEO)
    kinds = {(s.module_path.rsplit(".", 1)[-1], s.decision) for s in sites}
    assert kinds == {("attn1", "rewritten"), ("attn2", "skipped")}, text
    assert all(s.q_layout == layout and s.layout_source == "declared" for s in sites if s.decision == "rewritten")
    paths = [n for n, _ in ref.named_modules() if re.search(r"^transformer_blocks\.\d+\.attn1$", n)]
    expected = _oracle_output(ref, inputs, paths, layout, stride)
    assert_close64(got, expected)
    assert_differs(got, plain)


def test_ltx_declaration_checked_against_the_call():
    model, inputs = _build("diffusers:ltx-video")
    bad = list(inputs)
    bad[5] = 4  # height 4 x width 8 x 4 frames = 128 tokens, but hidden_states holds 256
    with pytest.raises(ValueError, match="hidden_states"):
        gridattn_fx.prepare(model, tuple(bad), hidden_states=_ltx_declaration())
