"""``rewrite()`` returns a GraphModule fixed to its example shapes: it must refuse other shapes.

16x16 and 8x32 tokens have the same count, so without a check the 16x16 grouping would silently
run on an 8x32 image (docs/design.md section 3: a GraphModule from rewrite() checks its input shapes or
is correct for every shape it accepts).
"""

import copy

import pytest
import torch

from models import ViT, build, image
from oracle import assert_close64, assert_differs, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx.frontends.api import capture, check_input_shapes  # noqa: E402

OPTS = {"stride": 2, "min_image_tokens": 0}


def _checks(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is check_input_shapes]


def _vit():
    torch.manual_seed(0)
    return build(ViT, depth=1, n_cls=1)  # no pos-embed: the eager model runs at any resolution


def test_same_token_count_other_grid_is_refused():
    model = _vit()
    x = image(2, 32, 32)  # 16x16 tokens
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    assert [s.decision for s in report.sites] == ["rewritten"], str(report)
    with torch.no_grad():
        got = gm(x)
        with oracle_mode(model, (1, 16, 16), stride=2):
            expected = model(x)
        assert_close64(got, expected)
        assert_differs(expected, model(x))
        # 8x32 tokens: same sequence length, another grid; the model itself runs fine there
        other = image(2, 16, 64)
        assert model(other).shape == got.shape
        with pytest.raises(ValueError, match=r"rewritten by gridattn_fx\.rewrite\(\).*\(2, 3, 32, 32\)") as err:
            gm(other)
        assert "(2, 3, 16, 64)" in str(err.value)
        with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\)"):
            gm.forward(other)  # the check is in the graph, not in a call hook


def test_other_batch_size_is_refused():
    """Rejected, not allowed: the captured graph carries the example batch size in its reshapes."""
    model = _vit()
    gm, _ = gridattn_fx.rewrite(model, (image(2, 16, 16),), **OPTS)
    with pytest.raises(ValueError, match=r"\(3, 3, 16, 16\) \(rewritten for \(2, 3, 16, 16\)\)"):
        gm(image(3, 16, 16))


def test_check_keeps_parameters_and_survives_copies_and_dead_code_elimination():
    model = _vit()
    x = image(2, 16, 16)
    gm, _ = gridattn_fx.rewrite(model, (x,), **OPTS)
    # the model's own names (gridattn_fx/frontends/state_dict.py), untouched by the inserted check
    assert list(gm.state_dict()) == list(model.state_dict())
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert len(_checks(gm)) == 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert len(_checks(gm)) == 1
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        assert_close64(twin(x), gm(x))
        with pytest.raises(ValueError):
            twin(image(2, 8, 32))


def test_graph_module_input_gets_a_checked_copy_and_stays_untouched():
    model = _vit()
    x = image(2, 16, 16)
    traced = capture(model, (x,))
    gm, report = gridattn_fx.rewrite(traced, (x,), **OPTS)
    assert gm is not traced and report.rewritten
    assert _checks(gm) and not _checks(traced)
    with torch.no_grad(), pytest.raises(ValueError, match=r"\(2, 3, 16, 16\)"):
        gm(image(2, 8, 32))
    with torch.no_grad():
        assert_close64(traced(x), model(x))  # the caller's module is as it was
