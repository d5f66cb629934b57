"""The fidelity benchmark's pieces: procedural data, SegViT, the committed weights, the metric."""

import os

import pytest
import torch

import gridattn_fx
from benchmarks.fidelity.data import NUM_CLASSES, make_batch
from benchmarks.fidelity.evaluate import WEIGHTS, load_model
from benchmarks.fidelity.metrics import miou
from benchmarks.fidelity.model import SegViT


def test_dataset_is_deterministic_and_covers_all_classes():
    x1, y1 = make_batch(123, 8)
    x2, y2 = make_batch(123, 8)
    assert x1.shape == (8, 3, 128, 128) and x1.dtype == torch.float32
    assert y1.shape == (8, 128, 128) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = make_batch(124, 8)
    assert not torch.equal(x1, x3)
    assert set(torch.unique(y1).tolist()) == set(range(NUM_CLASSES))


def test_segvit_forward_shape():
    model = SegViT().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 128))
    assert out.shape == (2, NUM_CLASSES, 128, 128)


def test_committed_weights_load_and_are_small():
    assert os.path.getsize(WEIGHTS) <= 5 * 1024 * 1024
    model = load_model()
    x, _ = make_batch(0, 1)
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_rewrite_covers_every_block():
    model = SegViT().eval()
    x = torch.randn(1, 3, 128, 128)
    gm, report = gridattn_fx.rewrite(model, (x,), stride=2)
    assert report.failure is None
    rewritten = sorted(s.module_path for s in report.rewritten)
    assert rewritten == [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    assert not report.skipped
    with torch.no_grad():
        assert gm(x).shape == model(x).shape


def test_miou_of_perfect_prediction_is_one():
    _, y = make_batch(5, 4)
    assert miou(y, y) == pytest.approx(1.0)
    wrong = (y + 1) % NUM_CLASSES
    assert miou(wrong, y) == pytest.approx(0.0)
