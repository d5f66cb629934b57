"""Per-site options (gridattn_fx/config/sites.py): one ``sites`` map, ``site_strides`` /
``site_groupings`` as its aliases, validation from one field table, and what the report credits.

Rewritten outputs equal the oracle for each site's own stride and grouping in float64; the
aliases decide exactly as the map does.
"""

import warnings

import pytest
import torch

from models import ViT, build, image
from oracle import assert_close64, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig, SiteOptions  # noqa: E402

OPTS = {"min_image_tokens": 0, "stride": 2}


def _rows(report):
    return {s.module_path: (s.decision, s.stride, s.grouping) for s in report.sites}


def test_sites_map_sets_stride_and_grouping_per_site_and_matches_the_oracle():
    model, x = build(ViT, depth=2, n_cls=0), image(2, 16, 16)   # 8x8 tokens
    sites = {"blocks.0.attn": SiteOptions(grouping="window"), "blocks.1.attn": {"stride": 4}}
    gm, report = gridattn_fx.rewrite(model, (x,), sites=sites, **OPTS)
    assert _rows(report) == {"blocks.0.attn": ("rewritten", (2, 2), "window"),
                             "blocks.1.attn": ("rewritten", (4, 4), "grid")}, str(report)
    assert "window grouping (sites), stride 2x2" in report.site(r"blocks\.0").reason
    assert "stride 4x4 (sites)" in report.site(r"blocks\.1").reason
    with torch.no_grad():
        out = gm(x)
    # each site's own oracle: block 0 window-grouped at stride 2, block 1 grid-grouped at stride 4
    with oracle_mode(model, (0, 8, 8), stride=2, grouping="window", only=["blocks.0.attn"]), \
            oracle_mode(model, (0, 8, 8), stride=4, only=["blocks.1.attn"]):
        expected = model(x)
    assert_close64(out, expected)


def test_aliases_decide_exactly_as_the_map_and_are_credited_by_name():
    model, x = build(ViT, depth=2, n_cls=1), image(1, 8, 12)
    _, by_map = gridattn_fx.rewrite(model, (x,), sites={"blocks.1.attn": SiteOptions(stride=1, grouping="window")},
                                    **OPTS)
    _, by_alias = gridattn_fx.rewrite(model, (x,), site_strides={"blocks.1.attn": 1},
                                      site_groupings={"blocks.1.attn": "window"}, **OPTS)
    assert _rows(by_map) == _rows(by_alias)
    assert "(sites)" in by_map.site(r"blocks\.1").reason and "(site_strides)" in by_alias.site(r"blocks\.1").reason


def test_unmatched_sites_keys_are_reported_under_their_option():
    model, x = build(ViT, depth=1, n_cls=1), image(1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = gridattn_fx.rewrite(model, (x,), sites={"nowhere.attn": SiteOptions(stride=4)},
                                        site_strides={"gone.attn": 2}, **OPTS)
    assert report.unmatched_site_keys == {"sites": ["nowhere.attn"], "site_strides": ["gone.attn"]}
    assert report.unmatched_site_strides == ["gone.attn"]
    assert "sites key 'nowhere.attn' matches no attention site in this graph" in str(report)
    assert any("sites key 'nowhere.attn'" in str(w.message) for w in caught)


@pytest.mark.parametrize("options,match", [
    ({"sites": {"a.attn": SiteOptions(stride=0)}}, r"'sites'\['a.attn'\].stride"),
    ({"sites": {"a.attn": {"grouping": "swin"}}}, r"'sites'\['a.attn'\].grouping"),
    ({"sites": {"a.attn": {"strides": 2}}}, r"unknown field"),
    ({"sites": {"a.attn": 2}}, r"SiteOptions"),
    ({"sites": ["a.attn"]}, r"option 'sites' must be a dict"),
    ({"sites": {"a.attn": SiteOptions(stride=2)}, "site_strides": {"a.attn": 4}}, r"contradicts"),
])
def test_bad_site_options_raise_naming_the_field(options, match):
    with pytest.raises((TypeError, ValueError), match=match):
        GridAttnConfig(**options)


def test_one_key_may_come_from_the_map_and_an_alias_when_they_agree():
    cfg = GridAttnConfig(sites={"a.attn": SiteOptions(stride=2)}, site_strides={"a.attn": (2, 2)},
                         site_groupings={"a.attn": "window"})
    assert cfg.stride_for("m.a.attn") == ((2, 2), " (sites key 'a.attn')")
    assert cfg.grouping_for("a.attn") == ("window", " (site_groupings)")
    # the alias repeats what the map says: the map's entry stands for both
    assert cfg.site_keys() == [("sites", "a.attn"), ("site_groupings", "a.attn")]
    # to_options() rebuilds the same config
    assert GridAttnConfig(**cfg.to_options()).stride_for("a.attn") == cfg.stride_for("a.attn")
