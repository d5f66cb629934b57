"""Window grouping and per-site groupings through the config, the policy and the backend.

Models are tests/models.py's (timm-like ViT, SegFormer-like reduced keys), compiled with the
``gridattn`` backend; rewritten outputs equal the oracle for each site's grouping in float64
(tests/oracle.py), skipped sites equal the untouched model, and the report says what happened.
"""

import warnings

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from models import SegFormerStage, ViT, build, image
from oracle import assert_close64, assert_differs, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig  # noqa: E402


def compiled(model, **options):
    options.setdefault("min_image_tokens", 0)
    options.setdefault("stride", 2)
    return torch.compile(model, backend="gridattn", options=options)


@pytest.mark.parametrize("n_cls,px", [(1, (8, 12)), (0, (8, 8)), (1, (10, 14))])
def test_vit_window_grouping_matches_its_oracle(n_cls, px):
    """cls token (regrouping at the call), none (regrouping moved to the projections), and a
    5x7 image (padded tiles)."""
    m = build(ViT, depth=2, n_cls=n_cls)
    x = image(2, *px)
    out = compiled(m, grouping="window")(x)
    report = gridattn_fx.last_report()
    assert report.failure is None and len(report.rewritten) == 2, str(report)
    row = report.site(r"blocks\.0\.attn")
    assert "window grouping, stride 2x2" in row.reason, row.reason
    assert "window 2x2" in str(report)
    lay = (n_cls, px[0] // 2, px[1] // 2)
    with oracle_mode(m, lay, stride=2, grouping="window"):
        expected = m(x)
    assert_close64(out, expected)
    with oracle_mode(m, lay, stride=2):  # grid grouping is another function
        assert_differs(expected, m(x))


def test_site_groupings_mix_grid_and_window():
    m = build(ViT, depth=2)
    x = image(1, 8, 8)
    out = compiled(m, site_groupings={"blocks.1.attn": "window"})(x)
    report = gridattn_fx.last_report()
    assert "window grouping (site_groupings), stride 2x2" in report.site(r"blocks\.1\.attn").reason
    assert report.site(r"blocks\.0\.attn").reason.startswith("image self-attention, stride 2x2")
    with oracle_mode(m, (1, 4, 4), stride=2, only=["blocks.0.attn"]), \
            oracle_mode(m, (1, 4, 4), stride=2, only=["blocks.1.attn"], grouping="window"):
        expected = m(x)
    assert_close64(out, expected)


def test_reduced_keys_window():
    m = build(SegFormerStage, depth=1, sr_ratio=2)
    x = image(1, 16, 16)  # 8x8 queries, 4x4 keys
    out = compiled(m, grouping="window")(x)
    report = gridattn_fx.last_report()
    assert len(report.rewritten) == 1, str(report)
    with oracle_mode(m, (0, 8, 8), (0, 4, 4), stride=2, grouping="window"):
        assert_close64(out, m(x))


def test_window_shuffle_training_stays_dense():
    m = ViT(depth=1).double().train()
    x = image(1, 8, 8)
    out = compiled(m, grouping="window", distributing="shuffle")(x)
    row = gridattn_fx.last_report().site(r"blocks\.0\.attn")
    assert row.decision == "skipped" and "undefined for window grouping" in row.reason, row.reason
    assert_close64(out, m(x))
    # in inference, distributing is straightforward: the window site is rewritten
    m.eval()
    torch._dynamo.reset()
    out = compiled(m, grouping="window", distributing="shuffle")(x)
    row = gridattn_fx.last_report().site(r"blocks\.0\.attn")
    assert row.decision == "rewritten" and "straightforward distributing (inference)" in row.reason
    with oracle_mode(m, (1, 4, 4), stride=2, grouping="window"):
        assert_close64(out, m(x))


def test_video_stride_on_an_image_model_warns_once_and_applies_gh_gw():
    m = build(ViT, depth=2)
    x = image(1, 8, 12)
    with pytest.warns(RuntimeWarning, match=r"option 'stride' \(2, 2, 3\)") as caught:
        out = compiled(m, stride=(2, 2, 3))(x)
    assert sum("video stride" in str(w.message) for w in caught) == 1  # once per graph, both sites named
    report = gridattn_fx.last_report()
    assert all(tuple(s.stride) == (2, 3) for s in report.rewritten) and len(report.rewritten) == 2
    with oracle_mode(m, (1, 4, 6), stride=(2, 3)):
        assert_close64(out, m(x))


def test_stride_larger_than_an_axis_is_skipped_with_the_stride_named():
    m = build(ViT, depth=1)
    x = image(1, 8, 16)  # 4x8 tokens
    with pytest.warns(RuntimeWarning, match=r"stride 8x2 is larger than an image axis.*blocks\.0\.attn"):
        out = compiled(m, stride=(8, 2), grouping="window")(x)
    row = gridattn_fx.last_report().site(r"blocks\.0\.attn")
    assert row.decision == "skipped" and "query image 4x8 is smaller than the stride 8x2" in row.reason
    assert_close64(out, m(x))  # the untouched model (compiled by inductor: rounding only)


@pytest.mark.parametrize("options,field", [
    ({"grouping": "tiles"}, "grouping"),
    ({"grouping": 2}, "grouping"),
    ({"site_groupings": {"blocks.0.attn": "swin"}}, "site_groupings"),
    ({"site_groupings": ["blocks.0.attn"]}, "site_groupings"),
    ({"stride": (2, 2, 2, 2)}, "stride"),
    ({"site_strides": {"blocks.0.attn": (2, 2, 0)}}, "site_strides"),
])
def test_bad_grouping_options_name_the_field(options, field):
    with pytest.raises((ValueError, TypeError), match=field):
        GridAttnConfig(**options)
    m = build(ViT, depth=1)
    with pytest.raises((ValueError, TypeError, BackendCompilerFailed), match=field):
        compiled(m, **options)(image(1, 8, 8))


def test_config_round_trips_the_new_options():
    cfg, _ = GridAttnConfig.from_options({"stride": (1, 2, 2), "grouping": "window",
                                          "site_groupings": {"a.attn": "grid"},
                                          "site_strides": {"b.attn": (2, 2, 2)}})
    assert cfg.stride == (1, 2, 2) and cfg.site_strides == {"b.attn": (2, 2, 2)}
    assert GridAttnConfig(**cfg.to_options()) == cfg
    assert cfg.grouping_for("model.a.attn") == ("grid", " (site_groupings key 'a.attn')")
    assert cfg.grouping_for("b.attn") == ("window", "")
    assert GridAttnConfig(preset=None).grouping == "grid"


def test_unmatched_site_groupings_key_is_reported():
    m = build(ViT, depth=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(m, site_groupings={"nowhere.attn": "window"})(image(1, 8, 8))
    report = gridattn_fx.last_report()
    assert report.unmatched_site_groupings == ["nowhere.attn"]
    assert "site_groupings key 'nowhere.attn' matches no attention site" in str(report)
    assert any("site_groupings key 'nowhere.attn'" in str(w.message) for w in caught)


@pytest.mark.parametrize("implementation", ["grouped", "masked"])
def test_window_grouping_with_symbolic_sizes(implementation):
    """dynamic=True: the window tiles are computed from symbolic sizes (guarded as for grid), and
    every resolution, divisible or not, equals its oracle."""
    from gridattn_fx.frontends.backend import apply_pass

    config, _ = GridAttnConfig.from_options({"stride": 2, "min_image_tokens": 0, "grouping": "window",
                                             "implementation": implementation})
    reports = []

    def backend(gm, example_inputs):
        new_gm, report = apply_pass(gm, example_inputs, config, False)
        reports.append(report)
        return new_gm

    m = build(ViT, depth=1)
    c = torch.compile(m, backend=backend, dynamic=True)
    for px in ((16, 24), (10, 14), (16, 24)):
        x = image(1, *px)
        out = c(x)
        row = reports[-1].site(r"blocks\.0\.attn")
        assert row.decision == "rewritten" and "symbolic sizes" in row.reason, row.reason
        with oracle_mode(m, (1, px[0] // 2, px[1] // 2), stride=2, grouping="window"):
            assert_close64(out, m(x), msg=f"{px}")
