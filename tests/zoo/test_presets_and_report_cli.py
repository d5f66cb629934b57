"""Presets on real models: the sd-unet preset's choices, and `python -m gridattn_fx report`."""

import re

import pytest
import torch

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import zoo  # noqa: E402
from zoo_required import missing_library  # noqa: E402
from gridattn_fx.__main__ import main  # noqa: E402


def _need(name):
    if not zoo.library_available(name):
        missing_library(zoo.entry(name).library)  # fails unless GRIDATTN_SKIP_ZOO=1 (tests/zoo_required.py)


def test_sd_unet_preset_rewrites_down_and_mid_self_attention_only():
    _need("diffusers:unet-sd21")
    model, inputs = zoo.build("diffusers:unet-sd21", dtype=torch.float64)
    gm, report = gridattn_fx.rewrite(model, inputs, preset="sd-unet")
    for site in report.sites:
        path = site.module_path
        if re.search(r"^(down_blocks|mid_block)\..*attn1$", path):
            assert site.decision == "rewritten" and "preset 'sd-unet'" in site.reason, path
        elif path.endswith("attn2"):  # cross-attention to text: ineligible, and said so first
            assert site.decision == "skipped" and "cross-attention" in site.reason, path
        else:  # up-block self-attention: the preset leaves it alone
            assert site.decision == "skipped" and "include" in site.reason and "sd-unet" in site.reason, path
    gm_masked, _ = gridattn_fx.rewrite(model, inputs, preset="sd-unet", implementation="masked")
    torch.testing.assert_close(gm(*inputs).sample, gm_masked(*inputs).sample, atol=1e-10, rtol=1e-9)


def test_report_command_prints_table_totals_and_flops(capsys):
    _need("timm:samvit_base_patch16")
    assert main(["report", "timm:samvit_base_patch16"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.attn" in out and "rewritten" in out
    assert re.search(r"sites found: 4; rewritten: 2; skipped: 2", out), out
    assert "window partition" in out
    before, after = map(float, re.search(r"whole-model FLOPs:\s+([\d.]+) G ->\s+([\d.]+) G", out).groups())
    assert 0 < after < before
