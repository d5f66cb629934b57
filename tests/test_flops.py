"""Whole-model FLOPs (gridattn_fx.tools.flops): the CPU flash-SDPA op is counted, fake and real runs agree,
and a rewritten graph costs exactly the attention FLOPs the report says it saves."""

import torch
import torch.nn.functional as F

import gridattn_fx
from gridattn_fx.tools.demo_model import build_demo_model
from gridattn_fx.tools.flops import count_flops, register_cpu_sdpa_flops


def test_cpu_sdpa_is_counted():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 24, 16), torch.randn(2, 3, 24, 8)
    expected = 2 * (2 * 3) * 40 * 24 * (16 + 8)
    assert count_flops(F.scaled_dot_product_attention, (q, k, v)) == expected
    assert count_flops(F.scaled_dot_product_attention, (q, k, v), fake=False) == expected
    register_cpu_sdpa_flops()  # idempotent
    assert count_flops(lambda a, b, c: F.scaled_dot_product_attention(a, b, c), (q, k, v)) == expected


def test_rewritten_graph_saves_the_reported_attention_flops():
    model, x = build_demo_model(128, embed_dim=32, depth=2, num_heads=2)
    gm, report = gridattn_fx.rewrite(model, (x,), stride=2, min_image_tokens=0)
    assert len(report.rewritten) == 2
    before, after = count_flops(model, (x,)), count_flops(gm, (x,))
    assert count_flops(gm, (x,), fake=False) == after
    attn_before, attn_after = report.flops()
    assert before - after == attn_before - attn_after > 0
