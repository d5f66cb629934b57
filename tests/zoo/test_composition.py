"""The pass composed with what users stack on a model before compiling it: torchao quantisation,
peft LoRA adapters, diffusers' fused QKV projections and attention slicing, channels_last memory.

Each stack is compiled twice through the pass (its graphs run eagerly): with the grouped rewrite,
and with the masked form, which is the same stack with dense attention under the grid mask, the
semantics the rewrite must keep (docs/design.md section 1). Both must rewrite the same sites, as
many as the plain model (or, with slicing, every slice of them), and give the same output:
float32 tolerance 1e-5 absolute, except under int8 dynamic activation quantisation, where the
rewrite's float rounding moves values across quantisation steps; there the bound is the error the
quantisation itself introduces (masked quantised vs masked float). Every test also checks that the
rewrite changed the output (it is not the dense model).
"""

import copy

import pytest
import torch

import gridattn_fx
from gridattn_fx import GridAttnConfig, zoo
from gridattn_fx.frontends.backend import compile_with_pass
from zoo_required import missing_library

ATOL = 1e-5


def _library(name):
    try:
        return __import__(name)
    except ImportError:
        missing_library(name)


@pytest.fixture(autouse=True)
def _diffusers():
    if not zoo.library_available("diffusers:dit"):
        missing_library("diffusers")


def _output(out):
    return out.sample if hasattr(out, "sample") else out[0]


def _run(model, inputs, implementation):
    """(output, rewritten sites' paths, every site's path) of ``model`` through the pass."""
    config = GridAttnConfig(stride=2, min_image_tokens=0, implementation=implementation)
    torch._dynamo.reset()
    gridattn_fx.report_history(clear=True)
    compiled = torch.compile(model, backend=lambda gm, ex: compile_with_pass(gm, ex, config, lambda g, i: g.forward))
    with torch.no_grad():
        out = _output(compiled(*inputs))
    sites = [s for r in gridattn_fx.report_history(clear=True) for s in r.sites]
    return out, sorted(s.module_path for s in sites if s.decision == "rewritten"), sites


def _dense(model, inputs):
    with torch.no_grad():
        return _output(model(*inputs))


def _check(model, inputs, expected_sites, atol=ATOL):
    grouped, rewritten, _ = _run(model, inputs, "grouped")
    masked, rewritten_masked, _ = _run(model, inputs, "masked")
    assert rewritten == rewritten_masked and len(rewritten) == expected_sites, rewritten
    torch.testing.assert_close(grouped, masked, atol=atol, rtol=0)
    assert (grouped - _dense(model, inputs)).abs().max() > 100 * atol  # the rewrite did something
    return grouped, masked, rewritten


def _dit():
    torch.manual_seed(0)
    model, inputs = zoo.build("diffusers:dit")
    return model.eval(), tuple(inputs)


def _unet():
    torch.manual_seed(0)
    model, inputs = zoo.build("diffusers:unet-sd21")
    return model.eval(), tuple(inputs)


def _plain_sites(model, inputs):
    return len(_run(model, inputs, "grouped")[1])


def test_torchao_int8_weight_only():
    _library("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model, inputs = _dit()
    sites = _plain_sites(model, inputs)
    quantize_(model, Int8WeightOnlyConfig())
    assert type(model.transformer_blocks[0].attn1.to_q.weight).__name__ not in ("Parameter", "Tensor")  # quantised
    _check(model, inputs, sites)


def test_torchao_int8_dynamic_activations():
    _library("torchao")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model, inputs = _dit()
    sites = _plain_sites(model, inputs)
    float_masked = _run(model, inputs, "masked")[0]
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    grouped, rewritten, _ = _run(model, inputs, "grouped")
    masked, rewritten_masked, _ = _run(model, inputs, "masked")
    assert rewritten == rewritten_masked and len(rewritten) == sites
    quantisation_error = (masked - float_masked).abs().max()
    assert quantisation_error > 0
    assert (grouped - masked).abs().max() <= quantisation_error


def test_peft_lora_on_the_attention_projections():
    _library("peft")
    from peft import LoraConfig, inject_adapter_in_model

    model, inputs = _dit()
    sites = _plain_sites(model, inputs)
    plain = _dense(model, inputs)
    # init_lora_weights=False: random A and B, so the adapters change the output
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
    model = inject_adapter_in_model(config, model)
    assert (_dense(model, inputs) - plain).abs().max() > 1e-3
    _check(model, inputs, sites)


def test_fused_qkv_projections():
    model, inputs = _unet()
    sites = _plain_sites(model, inputs)
    model.fuse_qkv_projections()
    assert hasattr(model.down_blocks[0].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    _check(model, inputs, sites)


def test_channels_last():
    model, inputs = _unet()
    sites = _plain_sites(model, inputs)
    model = model.to(memory_format=torch.channels_last)
    inputs = (inputs[0].contiguous(memory_format=torch.channels_last), *inputs[1:])
    _check(model, inputs, sites)


def test_attention_slicing():
    """diffusers' sliced attention runs one hand-written attention per slice of batch * heads: every
    self-attention slice is a site of its own and is rewritten."""
    model, inputs = _unet()
    plain = _run(model, inputs, "grouped")
    model = copy.deepcopy(model)
    model.set_attention_slice(1)
    _, rewritten, sites = _run(model, inputs, "grouped")
    # every slice of a rewritten site, and nothing else: the paths are the plain model's own
    assert set(rewritten) == set(plain[1]) and len(rewritten) > len(plain[1]), rewritten
    assert all(s.decision != "rewritten" for s in sites if s.module_path.endswith("attn2"))
    _check(model, inputs, len(rewritten))
