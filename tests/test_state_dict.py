"""rewrite()'s GraphModule has the model's state_dict keys, so the model's checkpoints load into it."""

import pytest
import torch
import torch.nn as nn

from models import ViT, build, image
from oracle import assert_close64, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")

OPTS = {"stride": 2, "min_image_tokens": 0}


def _vit():
    m = build(ViT, depth=2, grid=(8, 8))
    m.register_buffer("unused_stat", torch.ones(3, dtype=torch.float64))             # never read
    m.register_buffer("scratch", torch.zeros(2, dtype=torch.float64), persistent=False)
    return m


def test_keys_equal_the_models_and_a_checkpoint_loads_strictly():
    model, x = _vit(), image(1, 16, 16)
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    assert [s.decision for s in report.sites] == ["rewritten", "rewritten"]
    assert list(gm.state_dict()) == list(model.state_dict())   # same keys, same order
    # another model's checkpoint (a fine-tuned one, say): the graph computes with its weights
    other = _vit()
    gm.load_state_dict(other.state_dict())                       # strict
    with oracle_mode(other, (1, 8, 8), stride=2):
        assert_close64(gm(x), other(x))


def test_tied_weights_keep_both_keys():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = build(ViT, depth=1, grid=(8, 8))
            self.head = nn.Linear(16, 16).double()
            self.head2 = self.head                        # a module registered twice
            self.scale = self.vit.norm.weight             # a parameter registered twice

        def forward(self, x):
            return self.head2(self.vit(x)) * self.scale

    model, x = Tied().eval(), image(1, 16, 16)
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    assert report.rewritten
    assert list(gm.state_dict()) == list(model.state_dict())
    assert gm.get_parameter("scale") is gm.get_parameter("vit.norm.weight")
    other = Tied().eval()
    gm.load_state_dict(other.state_dict())
    with oracle_mode(other, (1, 8, 8), stride=2):
        assert_close64(gm(x), other(x))


def test_graph_module_input_keeps_its_names():
    model, x = _vit(), image(1, 16, 16)
    captured = gridattn_fx.capture(model, (x,))
    gm, _ = gridattn_fx.rewrite(captured, (x,), **OPTS)
    assert list(gm.state_dict()) == list(captured.state_dict())


def test_name_clash_keeps_dynamo_names_and_the_mapping():
    class Clash(nn.Module):  # a submodule called "code" would shadow GraphModule.code
        def __init__(self):
            super().__init__()
            self.code = build(ViT, depth=1, grid=(8, 8))

        def forward(self, x):
            return self.code(x)

    model, x = Clash().eval(), image(1, 16, 16)
    gm, report = gridattn_fx.rewrite(model, (x,), **OPTS)
    mapping = gm.meta["dynamo_flat_name_to_original_fqn"]
    assert {mapping[k] for k in gm.state_dict()} <= set(model.state_dict())
    gm.load_state_dict({k: model.state_dict()[mapping[k]] for k in gm.state_dict()})
    with oracle_mode(model, (1, 8, 8), stride=2):
        assert_close64(gm(x), model(x))
