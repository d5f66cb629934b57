"""Model zoo: every builder builds and runs eagerly, and ``rewrite()`` runs on it and reports.

Small configs with random weights; a library that is not installed fails its models with the
install command (skips them under GRIDATTN_SKIP_ZOO=1, tests/zoo_required.py). Run with ``-s`` to
see each model's rewrite report. Decisions are asserted only where the pass already handles the
model's attention form (plain SDPA ViTs); the other families' expected decisions belong to issues
3 and 4.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

import gridattn_fx
from gridattn_fx import zoo
from zoo_required import missing_library
from gridattn_fx.grid import TokenLayout

# (name, builder options): every registered model with its defaults, plus the attention-form
# variants the issues name.
CASES = [(name, {}) for name in zoo.names()] + [
    ("timm:vit_base_patch16_224", {"fused_attn": False}),
    ("timm:samvit_base_patch16", {"fused_attn": False}),
    ("transformers:vit", {"attn_implementation": "eager"}),
    ("transformers:sam-vision", {"attn_implementation": "eager"}),
    ("diffusers:unet-sd21", {"attn_processor": "classic"}),
    ("clip-mha", {"batch_first": True}),
]


def case_id(case):
    name, opts = case
    return name + "".join(f"[{k}={v}]" for k, v in opts.items())


# Plain SDPA ViTs: every site is image self-attention with a proven prefix+HxW layout.
EXPECTED_ALL_REWRITTEN = {
    ("timm:vit_base_patch16_224", ()): TokenLayout(1, 8, 8),
    ("timm:deit_base_distilled_patch16_224", ()): TokenLayout(2, 8, 8),
    ("timm:vit_small_patch14_reg4_dinov2", ()): TokenLayout(5, 8, 8),
    ("transformers:vit", ()): TokenLayout(1, 8, 8),
    ("transformers:dinov2-registers", ()): TokenLayout(5, 8, 8),
}


def _require_library(name):
    """Fail (skip under GRIDATTN_SKIP_ZOO=1) when the entry's library is not installed. (Not
    ``pytest.importorskip``: importing timm or segment_anything needs the zoo's torchvision
    stand-in, which ``zoo.build`` provides.)"""
    library = zoo.entry(name).library
    if not zoo.library_available(name):
        missing_library(library)  # fails unless GRIDATTN_SKIP_ZOO=1 (tests/zoo_required.py)


@functools.lru_cache(maxsize=None)
def _built(name, opts_items):
    return zoo.build(name, **dict(opts_items))


def _model(case):
    name, opts = case
    _require_library(name)
    return _built(name, tuple(sorted(opts.items())))


def _tensors(out):
    """The output's tensors in a fixed order (tensors, tuples, lists, dicts, ModelOutput)."""
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_builds_and_runs_eagerly(case):
    model, inputs = _model(case)
    assert not model.training
    with torch.no_grad():
        out = model(*inputs)
    tensors = _tensors(out)
    assert tensors, "the model returned no tensor"
    for t in tensors:
        if t.is_floating_point():
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rewrite_runs_and_reports(case):
    name, opts = case
    model, inputs = _model(case)
    with torch.no_grad():
        expected = _tensors(model(*inputs))
        gm, report = gridattn_fx.rewrite(model, inputs, stride=2, min_image_tokens=0)
        got = _tensors(gm(*inputs))
    print(f"\n### {case_id(case)}\n{report}")
    assert report.failure is None, report.failure
    # Same output structure, shapes and dtypes as the eager model.
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in expected]
    # The model's checkpoints load into the graph module: same state_dict keys.
    assert list(gm.state_dict()) == list(model.state_dict())

    layout = EXPECTED_ALL_REWRITTEN.get((name, tuple(sorted(opts.items()))))
    if layout is not None:
        assert report.sites and len(report.rewritten) == len(report.sites), str(report)
        for site in report.sites:
            assert site.q_layout == layout and site.k_layout == layout, str(report)


def test_registry_names_and_errors():
    names = zoo.names()
    assert len(names) == len(set(names)) >= 18
    for n in ["timm:samvit_base_patch16", "transformers:sam", "diffusers:unet-sd21", "sam:vit_b", "clip-mha"]:
        assert n in names
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.build("nope:model")


def test_dtype_and_seed_overrides():
    model, (x,) = zoo.build("clip-mha", dtype=torch.float64, seed=3)
    assert x.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    model2, (x2,) = zoo.build("clip-mha", dtype=torch.float64, seed=3)
    assert torch.equal(x, x2) and torch.equal(model.proj, model2.proj)
    _, (x3,) = zoo.build("clip-mha", seed=4)
    assert not torch.equal(x.float(), x3)


def test_importing_the_package_imports_no_model_library():
    code = ("import sys, gridattn_fx, gridattn_fx.zoo; "
            "print(sorted(m for m in ('timm', 'transformers', 'diffusers', 'segment_anything', 'torchvision') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_torchvision_stub_is_scoped_to_the_import():
    _require_library("timm:vit_base_patch16_224")
    from gridattn_fx.zoo import _torchvision_stub as stub

    model, _ = zoo.build("timm:vit_base_patch16_224")  # imports timm, through the stub if needed
    if stub.real_torchvision_available():
        pytest.skip("a working torchvision is installed: the stub is not used")
    # Nothing outside the import sees a torchvision.
    assert not any(k == "torchvision" or k.startswith("torchvision.") for k in sys.modules)
    # timm's data helpers hold stub objects that fail loudly when used.
    import timm.data.transforms as T

    assert T.InterpolationMode.BICUBIC.value == "bicubic"
    with pytest.raises(RuntimeError, match="gridattn_fx zoo stub"):
        T.transforms.Compose([])
