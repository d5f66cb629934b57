"""gridattn_fx.prepare on real library models (random weights from configs, float64).

diffusers' documented fast path, ``compile_repeated_blocks``, compiles each transformer block on
its own: without prepare() no block graph can prove its layout. After prepare() the blocks must
compute exactly what the whole-model rewrite computes; Flux's tokens are packed outside the model
and declared (``ImageTokens.from_position_ids("img_ids")``), checked against the oracle.

The regions are compiled with the gridattn pass followed by eager execution of its graph (the
``gridattn`` backend is the same pass followed by inductor, exercised in tests/test_prepare.py):
inductor compiles of UNets take minutes on a small CPU.
"""

import copy

import pytest
import torch

gridattn_fx = pytest.importorskip("gridattn_fx")
pytest.importorskip("diffusers")
from gridattn_fx import GridAttnConfig, ImageTokens, zoo  # noqa: E402
from gridattn_fx.frontends.backend import apply_pass  # noqa: E402
from oracle import assert_close64, assert_differs, log_grid_mask  # noqa: E402

OPTS = {"stride": 2, "min_image_tokens": 1, "strict": True}

# SDXL's block structure (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json: no attention at
# the first level, 2 and 10 transformer layers per block, text_time added conditioning), tiny.
UNET_SDXL_SMALL = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=32,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=32,
)


def _pass_only(stride):
    config = GridAttnConfig(**dict(OPTS, stride=stride))

    def gridattn_pass(gm, example_inputs):
        new_gm, _report = apply_pass(gm, example_inputs, config)
        return new_gm.forward
    return gridattn_pass


def _sites():
    return [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]


def _unet(kind):
    if kind == "sd21":
        return zoo.build("diffusers:unet-sd21", dtype=torch.float64)
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**UNET_SDXL_SMALL).double().eval()
    zoo._common.redraw_zero_init(model)
    added = {"text_embeds": torch.randn(1, 32, dtype=torch.float64), "time_ids": torch.randn(1, 6, dtype=torch.float64)}
    inputs = (torch.randn(1, 4, 32, 32, dtype=torch.float64), torch.tensor([500]),
              torch.randn(1, 77, 32, dtype=torch.float64), None, None, None, None, added)
    return model, inputs


@pytest.mark.parametrize("kind", ["sd21", "sdxl"])
def test_unet_compile_repeated_blocks_equals_whole_model(kind):
    model, inputs = _unet(kind)
    gm, whole = gridattn_fx.rewrite(model, inputs, **OPTS)
    with torch.no_grad():
        expected = gm(*inputs)[0]
    gridattn_fx.prepare(model, inputs)
    model.compile_repeated_blocks(backend=_pass_only(2))
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        got = model(*inputs).sample
    sites = _sites()
    rewritten = {(str(s.q_layout), s.layout_source) for s in sites if s.decision == "rewritten"}
    expected_layouts = {str(s.q_layout) for s in whole.rewritten}
    assert len(expected_layouts) >= 2, str(whole)  # two or three attention levels
    assert rewritten == {(layout, "remembered by prepare") for layout in expected_layouts}, rewritten
    assert all("attn2" in s.module_path for s in sites if s.decision == "skipped")  # cross-attention to text
    assert_close64(got, expected)
    with torch.no_grad():
        assert_differs(got, gridattn_fx.unprepare(model)(*inputs).sample)


def test_unet_stride_one_is_identity():
    model, inputs = _unet("sd21")
    ref = copy.deepcopy(model)
    gridattn_fx.prepare(model, inputs)
    model.compile_repeated_blocks(backend=_pass_only(1))
    with torch.no_grad():
        got, expected = model(*inputs).sample, ref(*inputs).sample
    assert all(s.decision == "skipped" for s in _sites())
    assert torch.equal(got, expected)


@pytest.mark.parametrize("stride", [2, 1])
def test_flux_declared_layout_against_oracle(stride):
    model, inputs = zoo.build("diffusers:flux", dtype=torch.float64)
    ref = copy.deepcopy(model)
    text = inputs[1].shape[1]
    gridattn_fx.prepare(model, inputs, hidden_states=ImageTokens.from_position_ids("img_ids"))
    model.compile_repeated_blocks(backend=_pass_only(stride))
    gridattn_fx.report_history(clear=True)
    with torch.no_grad():
        got = model(*inputs)[0]
        plain = ref(*inputs)[0]
    sites = _sites()
    if stride == 1:
        assert sites and all(s.decision == "skipped" for s in sites)
        assert torch.equal(got, plain)
        return
    # Joint attention: the text tokens come first (prefix), then the 16x16 image tokens.
    assert {(str(s.q_layout), s.decision, s.layout_source) for s in sites} == {
        (f"{text}+16x16", "rewritten", "declared")}
    oracle_inputs = list(inputs)
    oracle_inputs[7] = {"attention_mask": log_grid_mask((text, 16, 16), (text, 16, 16), 2)}
    with torch.no_grad():
        oracle = ref(*oracle_inputs)[0]
    assert_close64(got, oracle)
    assert_differs(got, plain)


def test_flux_layout_read_from_img_ids_without_a_declaration():
    """torch.compile alone: the pass reads the 16x16 grid from ``img_ids``'s values (layout/positions.py)
    and the compiled graph checks them at every call; another grid of the same length (8x32) gets
    its own compile, each equal to its oracle."""
    from gridattn_fx.frontends.backend import compile_with_pass

    model, inputs = zoo.build("diffusers:flux", dtype=torch.float64)
    text = inputs[1].shape[1]
    config = GridAttnConfig(**OPTS)
    compiled = torch.compile(model, backend=lambda gm, ex: compile_with_pass(gm, ex, config, lambda g, i: g.forward))
    gridattn_fx.report_history(clear=True)
    for h, w in [(16, 16), (8, 32)]:
        args = list(inputs)
        args[4] = zoo._diffusers.flux_ids(h, w)
        oracle_args = list(args)
        oracle_args[7] = {"attention_mask": log_grid_mask((text, h, w), (text, h, w), 2)}
        with torch.no_grad():
            got, oracle, plain = compiled(*args)[0], model(*oracle_args)[0], model(*args)[0]
        sites = _sites()
        assert {(str(s.q_layout), s.decision, s.layout_source) for s in sites} == {
            (f"{text}+{h}x{w}", "rewritten", "position values")}, [s.reason for s in sites]
        assert_close64(got, oracle)
        assert_differs(got, plain)


def test_flux_declaration_checked_against_the_call():
    model, inputs = zoo.build("diffusers:flux", dtype=torch.float64)
    bad = list(inputs)
    bad[4] = zoo._diffusers.flux_ids(8, 16)  # ids of another grid than hidden_states holds
    with pytest.raises(ValueError, match="'hidden_states'.*128"):
        gridattn_fx.prepare(model, tuple(bad), hidden_states=ImageTokens.from_position_ids("img_ids"))
