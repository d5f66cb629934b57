"""The coverage table (``python -m gridattn_fx coverage``, tools/coverage.py) and the classes it
counts as rewritten through position values, checked in float64: the grouped rewrite equals dense
attention under the grid mask of the layout the positions give.
"""

import types

import pytest
import torch

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig, zoo  # noqa: E402
from gridattn_fx.frontends.backend import compile_with_pass  # noqa: E402
from zoo_required import missing_library  # noqa: E402


@pytest.fixture(autouse=True)
def _diffusers():
    if not zoo.library_available("diffusers:dit"):
        missing_library("diffusers")


def _double(inputs):
    def cast(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
    return {k: cast(v) for k, v in inputs.items()}


def _run(model, inputs, implementation):
    config = GridAttnConfig(stride=2, min_image_tokens=0, strict=True, implementation=implementation)
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    compiled = torch.compile(model, backend=lambda gm, ex: compile_with_pass(gm, ex, config, lambda g, i: g.forward))
    with torch.no_grad():
        out = compiled(**inputs)[0]
    return out, [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]


# class -> the (q layout, layout source) of its rewritten sites
REWRITTEN = {
    # Flux's ids / Flux 2's (t, h, w, l) ids per batch entry: text in front of 8x8 image tokens,
    # read from the ids' values with no declaration
    "ChromaTransformer2DModel": {("8+8x8", "position values")},
    "Flux2Transformer2DModel": {("8+8x8", "position values")},
    # a view patchify of the NCTHW latents (4 frames of 8x8 patches)
    "CosmosTransformer3DModel": {("4x8x8", "proven in this graph")},
    # graph breaks at data-dependent ops (mask.sum().tolist(), a branch on the inputs, bincount) between
    # the patch embedding and the blocks: the layout handed over by tensor identity
    # its noise refiner, and its joint layers (text and image written into a fresh sequence)
    "Lumina2Transformer2DModel": {("8x8", "handed over across a split"), ("8+8x8", "handed over across a split")},
    "OmniGenTransformer2DModel": {("9+8x8", "handed over across a split")},
    "HiDreamImageTransformer2DModel": {("8x8+24", "handed over across a split")},  # the double-stream blocks
}


@pytest.mark.parametrize("name", sorted(REWRITTEN))
def test_classes_grouped_equal_masked(name):
    """Classes the coverage table counts and no other test builds: the grouped rewrite equals the
    masked form (dense attention under the grid mask) in float64."""
    from gridattn_fx.zoo._diffusers_classes import CLASSES

    torch.manual_seed(0)
    model, inputs = CLASSES[name]()
    model, inputs = model.eval().double(), _double(inputs)
    grouped, sites = _run(model, inputs, "grouped")
    masked, masked_sites = _run(model, inputs, "masked")
    with torch.no_grad():
        plain = model(**inputs)[0]
    assert {(str(s.q_layout), s.layout_source) for s in sites if s.decision == "rewritten"} == REWRITTEN[name], [
        s.reason for s in sites]
    assert [s.decision for s in masked_sites] == [s.decision for s in sites]
    torch.testing.assert_close(grouped, masked, atol=1e-10, rtol=1e-9)
    assert not torch.allclose(grouped, plain)


def test_coverage_command_rows():
    from gridattn_fx.tools.coverage import run_coverage

    lines = []
    args = types.SimpleNamespace(classes=["DiTTransformer2DModel", "FluxTransformer2DModel", "SanaTransformer2DModel",
                                          "QwenImageTransformer2DModel", "MochiTransformer3DModel"], stride=2)
    assert run_coverage(args, echo=lines.append) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines if line.startswith("| ") and "Model" in line}
    # class | status | rewritten / sites | graphs | attention outside graphs | layout from | why
    assert rows["DiTTransformer2DModel"][1:5] == ["automatic", "1 / 1", "1", "0"]
    assert rows["FluxTransformer2DModel"][1] == "automatic" and rows["FluxTransformer2DModel"][5] == "position values"
    assert rows["SanaTransformer2DModel"][1] == "dense by design"
    qwen = rows["QwenImageTransformer2DModel"]
    assert qwen[1] == "dense" and "ImageTokens(" in qwen[6], qwen
    # Mochi's block attention runs in a frame Dynamo gives up on at a data-dependent nonzero: the
    # table compiles it again with the setting the break's hint names, and says so
    mochi = rows["MochiTransformer3DModel"]
    assert mochi[1:5] == ["automatic", "1 / 2", "1", "0"], mochi
    assert "with `torch._dynamo.config.capture_dynamic_output_shape_ops = True`: without it 1 attention" in mochi[6]
    assert lines[-1].startswith("coverage: 3 of 5 classes rewritten with no declaration (1 of them with a Dynamo "
                                "capture setting;"), lines[-1]


def test_coverage_command_rejects_an_unknown_class(capsys):
    from gridattn_fx.__main__ import main

    assert main(["coverage", "NoSuchModel"]) == 2
    assert "unknown class(es) NoSuchModel" in capsys.readouterr().err


def test_mochi_block_attention_is_rewritten_with_dynamic_output_shapes():
    """With the setting the graph break's hint names, Dynamo captures the nonzero and the block
    attention is a site: its video is proven (4x8x8, then the valid text tokens, a data-dependent
    count) and rewritten; one graph serves every count of valid tokens, and each call equals dense
    attention under the grid mask (the masked form) in float64."""
    from gridattn_fx.zoo._diffusers_classes import CLASSES

    torch.manual_seed(0)
    model, inputs = CLASSES["MochiTransformer3DModel"]()
    model, inputs = model.eval().double(), _double(inputs)
    valid = inputs["encoder_attention_mask"].size(1)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for kept in (valid, 3, 0):
            mask = inputs["encoder_attention_mask"].clone()
            mask[:, kept:] = False
            call = dict(inputs, encoder_attention_mask=mask)
            out, sites = _run(model, call, "grouped")
            masked, _ = _run(model, call, "masked")
            with torch.no_grad():
                plain = model(**call)[0]
            block = [s for s in sites if s.module_path.endswith("attn1")]
            assert len(block) == 1 and block[0].decision == "rewritten", [(s.module_path, s.reason) for s in sites]
            assert str(block[0].q_layout) == "4x8x8+?" and "data-dependent" in block[0].reason, block[0].reason
            torch.testing.assert_close(out, masked, atol=1e-10, rtol=1e-9)
            assert not torch.allclose(out, plain, atol=1e-6)
