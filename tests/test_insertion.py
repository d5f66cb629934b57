"""Replacement insertion (ir/insertion.py ``inline``): the grid form is traced straight into
the graph through fx.Proxy objects of the site's inputs, and every inserted node carries the
metadata inductor's pattern matcher gives its replacements (stack_trace, nn_module_stack,
source_fn_stack), so that inductor's debug output and provenance still name the model's source line.
"""

import pytest
import torch
import torch.fx as fx

from models import ViT, build, image
from oracle import assert_close64, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx.frontends.api import capture  # noqa: E402
from gridattn_fx.ir.insertion import inline  # noqa: E402


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]


@pytest.mark.parametrize("move", [True, False])
def test_rewritten_nodes_carry_the_sites_stack_trace_and_module_path(move):
    model = build(ViT, n_cls=0, depth=1)
    inputs = (image(2, 16, 12),)
    original = capture(model, inputs)
    (site,) = _sdpa_nodes(original)
    assert site.meta.get("stack_trace") and site.meta.get("nn_module_stack")

    gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0, move_regrouping=move)
    assert report.sites[0].decision == "rewritten", str(report)
    inserted = [n for n in gm.graph.nodes if "gridattn" in n.meta and n.meta["gridattn"] != "size"]
    assert inserted
    by_tag = {}
    for node in inserted:
        by_tag.setdefault(node.meta["gridattn"], []).append(node)
        assert node.meta.get("stack_trace"), f"{node.name} ({node.meta['gridattn']}) has no stack_trace"
    # the attention itself: exactly the site's source line and module path
    for node in by_tag[report.sites[0].form]:
        assert node.meta["stack_trace"] == site.meta["stack_trace"]
        assert node.meta["nn_module_stack"] == site.meta["nn_module_stack"]
        if "source_fn_stack" in site.meta:
            assert node.meta["source_fn_stack"] == site.meta["source_fn_stack"]
    if move:  # moved regroupings take the metadata of the tensor they regroup (a top-level one: no module)
        assert {"cluster", "recover"} <= set(by_tag), sorted(by_tag)
    with torch.no_grad(), oracle_mode(model, (0, 8, 6), None, 2):
        expected = model(*inputs)
    with torch.no_grad():
        assert_close64(gm(*inputs), expected)


def test_inline_records_into_the_graph_in_place_with_constants_on_the_module():
    """No second graph: the function runs on proxies of the graph's nodes; a tensor constant it makes
    becomes an attribute of the graph's own module, as fx.Tracer does for its root."""
    class M(torch.nn.Module):
        def forward(self, x):
            return x.relu() * 2

    gm = fx.symbolic_trace(M())
    relu = next(n for n in gm.graph.nodes if n.target == "relu")
    relu.meta["stack_trace"] = "File \"model.py\", line 1, in forward"
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    result, new = inline(gm.graph, lambda t: t.unsqueeze(0).squeeze(0) + torch.ones(3), [x], relu, relu, "test")
    relu.replace_input_with(x, result)
    gm.graph.lint()
    gm.recompile()
    assert [n.op for n in new] == ["call_method", "call_method", "get_attr", "call_function"]
    assert all(n.meta["stack_trace"] == relu.meta["stack_trace"] and n.meta["gridattn"] == "test" for n in new)
    t = torch.randn(3)
    assert torch.equal(gm(t), ((t + 1).relu()) * 2)
