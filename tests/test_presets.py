"""Presets: plain option bundles that explicit options override, credited in the report."""

import pytest

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig  # noqa: E402
from gridattn_fx.config.presets import PRESETS, preset_for_model  # noqa: E402

from models import ViT, build, image  # noqa: E402


def test_presets_are_data_and_explicit_options_win():
    config, inductor = GridAttnConfig.from_options({"preset": "sd-unet", "stride": 4})
    assert inductor == {}
    assert config.stride == (4, 4)  # explicit
    assert config.include == tuple(PRESETS["sd-unet"]["options"]["include"])  # from the preset
    assert config.min_image_tokens == 0
    assert "stride" not in config.preset_fields and "include" in config.preset_fields


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="preset"):
        GridAttnConfig.from_options({"preset": "nope"})


def test_report_credits_the_preset_for_its_decisions():
    model = build(ViT, depth=1, grid=(6, 10))
    x = image(1, 12, 20)
    # 'vit' sets min_image_tokens=1024: the 60-token image is skipped, and the report says who decided
    _, report = gridattn_fx.rewrite(model, (x,), preset="vit")
    site = report.sites[0]
    assert site.decision == "skipped" and "min_image_tokens" in site.reason and "preset 'vit'" in site.reason
    assert report.preset == "vit" and "preset=vit" in str(report)
    # an explicit option overrides the preset and is not credited to it
    _, report = gridattn_fx.rewrite(model, (x,), preset="vit", min_image_tokens=0)
    site = report.sites[0]
    assert site.decision == "rewritten" and "preset 'vit'" in site.reason  # the stride is still the preset's
    assert "min_image_tokens" not in site.reason


@pytest.mark.parametrize("name,preset", [("sam:vit_b", "sam"), ("timm:samvit_base_patch16", "sam"),
                                         ("transformers:sam-vision", "sam"), ("diffusers:unet-sd21", "sd-unet"),
                                         ("transformers:segformer", "segformer"), ("timm:vit_base_patch16_224", "vit")])
def test_zoo_models_map_to_their_paper_preset(name, preset):
    assert preset_for_model(name) == preset
