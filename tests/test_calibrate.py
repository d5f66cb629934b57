"""Per-site strides (``site_strides``) and ``calibrate`` (docs/design.md section 2)."""

import pytest
import torch

from models import ViT, build, image
from oracle import assert_close64, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import GridAttnConfig  # noqa: E402
from gridattn_fx.tools.calibrate import relative_error  # noqa: E402

LAYOUT = (1, 8, 8)


def _vit(depth=3, quiet_first_block=False):
    model = build(ViT, depth=depth, n_cls=1, grid=(8, 8)).eval()
    if quiet_first_block:  # an attention whose output barely matters: cheap to coarsen
        with torch.no_grad():
            model.blocks[0].attn.proj.weight.mul_(1e-3)
    return model


# ---------------------------------------------------------------------------------------------
# site_strides
# ---------------------------------------------------------------------------------------------
def test_site_strides_through_the_backend_match_per_site_oracles():
    model = _vit()
    x = image(2, 16, 16)
    strides = {"blocks.0.attn": 2, "blocks.1.attn": (4, 2), "blocks.2.attn": 1}
    compiled = torch.compile(model, backend="gridattn", options={"stride": 1, "min_image_tokens": 0,
                                                                 "site_strides": strides})
    out = compiled(x)
    report = gridattn_fx.last_report()
    assert [s.stride for s in report.rewritten] == [(2, 2), (4, 2)], str(report)
    third = report.site("blocks.2.attn")
    assert third.decision == "skipped" and "stride 1" in third.reason and "(site_strides)" in third.reason
    assert "(site_strides)" in report.site("blocks.0.attn").reason
    with oracle_mode(model, LAYOUT, stride=2, only=["blocks.0.attn"]), \
         oracle_mode(model, LAYOUT, stride=(4, 2), only=["blocks.1.attn"]):
        assert_close64(out, model(x))


def test_site_strides_override_the_default_stride_only_where_listed():
    model = _vit(depth=2)
    gm, report = gridattn_fx.rewrite(model, (image(1, 16, 16),), stride=2, min_image_tokens=0,
                                     site_strides={"blocks.1.attn": 4})
    assert [s.stride for s in report.sites] == [(2, 2), (4, 4)]


@pytest.mark.parametrize("value,error,match", [
    (["blocks.0.attn"], TypeError, "site_strides"),
    ({3: 2}, TypeError, "module paths"),
    ({"a": "2"}, TypeError, r"site_strides'\['a'\]"),
    ({"a": 0}, ValueError, r"site_strides'\['a'\] must be >= 1"),
])
def test_bad_site_strides_are_rejected_by_name(value, error, match):
    with pytest.raises(error, match=match):
        GridAttnConfig(site_strides=value)


def test_bad_distributing_is_rejected_by_name():
    with pytest.raises(ValueError, match="distributing"):
        GridAttnConfig.from_options({"distributing": "random"})


def test_config_round_trips_through_options():
    config = GridAttnConfig.from_preset("sam", min_image_tokens=5, site_strides={"a.b": 4})
    again, inductor = GridAttnConfig.from_options(config.to_options())
    assert again == config and not inductor


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------
def _samples(n=2):
    return [(image(1, 16, 16),) for _ in range(n)]


def _measured_error(model, options, samples):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="gridattn", options=options, dynamic=False)
    errors = [relative_error(model(*s), compiled(*s)) for s in samples]
    return sum(errors) / len(errors), gridattn_fx.last_report()


def test_calibration_beats_uniform_strides_at_the_same_budget():
    model, samples = _vit(depth=2, quiet_first_block=True), _samples()
    probe = gridattn_fx.calibrate(model, samples, budget=1.0, min_image_tokens=0)
    e2, e4 = probe.uniform[(2, 2)][0], probe.uniform[(4, 4)][0]
    assert e2 < e4
    budget = (e2 + e4) / 2  # uniform stride 2 fits, uniform stride 4 does not
    cal = gridattn_fx.calibrate(model, samples, budget=budget, strides=(1, 2, 4), min_image_tokens=0)
    assert cal.site_strides == {"blocks.0.attn": (4, 4), "blocks.1.attn": (2, 2)}, str(cal)
    assert cal.error <= budget
    assert cal.saved_flops > cal.uniform[(2, 2)][1]
    # the backend accepts the result and the error it reports is the error the model shows
    error, report = _measured_error(model, cal.options, samples)
    assert [s.stride for s in report.rewritten] == [(4, 4), (2, 2)]
    assert error == pytest.approx(cal.error, rel=1e-6)
    before, after = report.flops()
    assert before - after == cal.saved_flops


def test_calibration_extremes():
    model, samples = _vit(depth=2), _samples(1)
    nothing = gridattn_fx.calibrate(model, samples, budget=0.0, min_image_tokens=0)
    assert set(nothing.site_strides.values()) == {(1, 1)} and nothing.saved_flops == 0
    everything = gridattn_fx.calibrate(model, samples, budget=10.0, strides=(2, 4), min_image_tokens=0)
    assert set(everything.site_strides.values()) == {(4, 4)}
    assert everything.saved_flops == everything.uniform[(4, 4)][1]


def test_calibration_with_a_user_metric():
    model, samples = _vit(depth=2), _samples(1)
    seen = []

    def argmax_disagreement(ref, out):
        seen.append(1)
        return float((ref.argmax(-1) != out.argmax(-1)).double().mean())

    cal = gridattn_fx.calibrate(model, samples, budget=0.05, metric=argmax_disagreement, min_image_tokens=0)
    assert seen and cal.error <= 0.05
    assert "calibrated: error" in str(cal)


def test_calibration_only_considers_eligible_sites():
    model, samples = _vit(depth=2), _samples(1)
    cal = gridattn_fx.calibrate(model, samples, budget=1.0, min_image_tokens=0, exclude=["blocks\\.1\\."])
    assert list(cal.site_strides) == ["blocks.0.attn"]
    assert cal.options["exclude"] == ["blocks\\.1\\."]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(budget=-1), ValueError, "budget"),
    (dict(strides=(1,)), ValueError, "nothing but stride 1"),
    (dict(strides=("x",)), TypeError, "strides"),
])
def test_calibration_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gridattn_fx.calibrate(_vit(depth=1), _samples(1), **kwargs)


def test_calibration_needs_eval_mode_and_equal_shapes():
    model = _vit(depth=1)
    with pytest.raises(ValueError, match="same shapes"):
        gridattn_fx.calibrate(model, [(image(1, 16, 16),), (image(1, 16, 20),)])
    with pytest.raises(ValueError, match="eval"):
        gridattn_fx.calibrate(model.train(), _samples(1))


# ---------------------------------------------------------------------------------------------
# calibrate: groupings per site and per head, at a FLOPs cap
# ---------------------------------------------------------------------------------------------
GROUPINGS = ("grid", "window", ("grid", "window"))


def _vit4(depth=2):
    return build(ViT, heads=4, depth=depth, n_cls=1, grid=(8, 8)).eval()


def test_least_error_within_a_flops_cap():
    model, samples = _vit4(), _samples()
    cal = gridattn_fx.calibrate(model, samples, strides=(1, 2, 4), groupings=GROUPINGS, max_flops_ratio=0.25,
                                min_image_tokens=0)
    assert cal.flops_ratio <= 0.25 + 1e-9, str(cal)
    # every uniform configuration that fits the cap was a finalist: none is better
    fitting = [err for _, (err, saved) in cal.uniform_by_grouping.items()
               if saved >= cal.flops_before * 0.75]
    assert len(fitting) >= 3 and cal.error <= min(fitting) + 1e-12, str(cal)
    # per-head groupings were measured on every site, and what comes back compiles to the same error
    assert {o.grouping for o in cal.options_measured} == set(GROUPINGS)
    error, report = _measured_error(model, cal.options, samples)
    assert error == pytest.approx(cal.error, rel=1e-6)
    before, after = report.flops()
    assert before - after == cal.saved_flops
    for row in report.rewritten:
        assert row.grouping == ("|".join(cal.site_groupings[row.module_path])
                                if isinstance(cal.site_groupings.get(row.module_path), tuple)
                                else cal.site_groupings.get(row.module_path, "grid"))
    assert "flops_ratio" in str(cal) and "=" in cal.describe()


def test_calibration_may_choose_shared_tokens():
    model, samples = _vit4(), _samples(1)
    cal = gridattn_fx.calibrate(model, samples, budget=10.0, strides=(2,), shared_pools=(0, 2), min_image_tokens=0)
    assert {o.shared_pool for o in cal.options_measured} == {0, 2}
    assert ((2, 2), "grid", 2) in cal.uniform_by_grouping
    error, report = _measured_error(model, cal.options, samples)
    assert error == pytest.approx(cal.error, rel=1e-6)
    assert {r.shared_pool for r in report.rewritten} == set(cal.site_pools.values()) | (
        {0} if len(cal.site_pools) < len(report.rewritten) else set())


def test_a_budget_prefers_the_grouping_with_less_error_at_equal_flops():
    model, samples = _vit4(), _samples(1)
    cal = gridattn_fx.calibrate(model, samples, budget=10.0, strides=(2,), groupings=GROUPINGS, min_image_tokens=0)
    assert set(cal.site_strides.values()) == {(2, 2)}
    uniform = [err for err, _ in cal.uniform_by_grouping.values()]
    assert len(uniform) == 3 and cal.error <= min(uniform) + 1e-12, str(cal)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_flops_ratio=0), ValueError, "max_flops_ratio"),
    (dict(max_flops_ratio=1.5), ValueError, "max_flops_ratio"),
    (dict(groupings="grid"), TypeError, "groupings"),
    (dict(groupings=("tiles",)), ValueError, "groupings"),
    (dict(shared_pools=2), TypeError, "shared_pools"),
    (dict(shared_pools=(1,)), ValueError, "shared_pools"),
])
def test_calibration_rejects_bad_grouping_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gridattn_fx.calibrate(_vit4(depth=1), _samples(1), **kwargs)
