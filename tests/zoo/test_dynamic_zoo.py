"""Dynamic shapes on real library models across a resolution change under default
torch.compile (dynamic=None: the second resolution recompiles with symbolic sizes). Every call must
equal (float64) the static-shape gridattn rewrite at that resolution; stride 1 gives the untouched
model. The compiles run the gridattn pass without inductor (tests/test_dynamic_shapes.py checks
the real backend), so that each test stays within seconds.
"""

import re

import pytest
import torch

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import zoo  # noqa: E402
from gridattn_fx.config.options import GridAttnConfig  # noqa: E402
from gridattn_fx.frontends.backend import apply_pass  # noqa: E402

from oracle import assert_close64, assert_differs, assert_equal_exact  # noqa: E402


class PassBackend:
    def __init__(self, **options):
        self.config, _ = GridAttnConfig.from_options({"min_image_tokens": 0, **options})
        self.reports = []

    def __call__(self, gm, example_inputs):
        new_gm, report = apply_pass(gm, example_inputs, self.config)
        self.reports.append(report)
        return new_gm


def _tensor(out):
    for attr in ("sample", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_sequence(model, inputs_at, sizes, stride, site_pattern):
    """Call the default-dynamic compile at each size; compare with the static rewrite there."""
    backend = PassBackend(stride=stride)
    compiled = torch.compile(model, backend=backend)
    seen, static = {}, {}
    for size in sizes:
        args = seen.setdefault(size, inputs_at(size))
        out = _tensor(compiled(*args))
        if stride == 1:
            assert_equal_exact(out, _tensor(model(*args)))
            continue
        if size not in static:
            static[size] = gridattn_fx.rewrite(model, args, stride=stride, min_image_tokens=0)
        static_gm, static_report = static[size]
        assert static_report.rewritten, str(static_report)
        dynamic_report = backend.reports[-1]
        assert ([s.decision for s in dynamic_report.sites if re.search(site_pattern, s.module_path)]
                == [s.decision for s in static_report.sites if re.search(site_pattern, s.module_path)])
        assert_close64(out, _tensor(static_gm(*args)), msg=f"size {size}")
        assert_differs(out, _tensor(model(*args)))
    return backend


def _dinov2():
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, image_size=56, patch_size=14,
                                       attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.Dinov2Model(config).to(torch.float64).eval()


@pytest.mark.parametrize("stride", [2, 1])
def test_hf_dinov2_across_resolutions_default_dynamic(stride):
    model = _dinov2()
    # 4x4 -> 4x6 -> 4x4 patch grids (56x56 -> 56x84 px, patch 14)
    backend = _check_sequence(model, lambda hw: (torch.randn(1, 3, *hw, dtype=torch.float64),),
                              [(56, 56), (56, 84), (56, 56)], stride, r"attention")
    # static 4x4, symbolic 4x6; Dinov2 returns its position embeddings untouched at the trained
    # 4x4 grid, so the symbolic graph guards that size out and 4x4 gets one more graph
    assert len(backend.reports) <= 3
    if stride == 2:
        assert "symbolic sizes" in backend.reports[-1].rewritten[0].reason


def _unet():
    if not zoo.library_available("diffusers:unet-sd21"):
        pytest.skip("diffusers is not installed")
    # one attention level (down and up) and the mid block: Dynamo traces the UNet three times here
    model, (sample, timestep, text) = zoo.build(
        "diffusers:unet-sd21", dtype=torch.float64, block_out_channels=(32, 32), attention_head_dim=(2, 2),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return model, timestep, text


@pytest.mark.parametrize("stride", [2, 1])
def test_sd_unet_across_resolutions_default_dynamic(stride):
    model, timestep, text = _unet()
    # latents 16x16 -> 16x24 -> 16x16: self-attention at 16x16 / 16x24 tokens and 8x8 / 8x12 (mid)
    _check_sequence(model, lambda hw: (torch.randn(1, 4, *hw, dtype=torch.float64), timestep, text),
                    [(16, 16), (16, 24), (16, 16)], stride, r"attn1$")
