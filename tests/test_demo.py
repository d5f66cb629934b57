"""The demo model and the ``python -m gridattn_fx demo`` command (tiny sizes: fast)."""

import pytest
import torch

import gridattn_fx.tools.demo as demo
from gridattn_fx.__main__ import main
from gridattn_fx.tools.demo_model import build_demo_model

TINY = dict(embed_dim=32, depth=1, num_heads=2)


def test_demo_model_is_deterministic_and_dense():
    m1, x1 = build_demo_model(64, **TINY)
    m2, x2 = build_demo_model(64, **TINY)
    assert not m1.training
    assert torch.equal(x1, x2)
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with torch.no_grad():
        out = m1(x1)
    assert out.shape == (1, 32, 4, 4)
    assert torch.equal(out, m2(x2).detach())


def test_demo_model_rejects_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        build_demo_model(100)


def test_run_demo_tiny_rewrites_and_times():
    lines = []
    result = demo.run_demo(
        image_size=128, stride=2, runs=5, warmup=0, min_image_tokens=0,
        model_kwargs=TINY, echo=lines.append,
    )
    text = "\n".join(lines)
    assert result.failure is None, text
    assert result.sites == 1 and result.rewritten == 1, text
    assert result.flops_after < result.flops_before
    assert set(result.median_ms) == {"inductor", "gridattn"}
    assert all(len(ts) == 5 for ts in result.times_ms.values())
    assert result.max_abs_diff_vs_eager["inductor"] < 1e-4
    assert "blocks.0.attn" in text and "median ms" in text and "Attention FLOPs" in text


def test_cli_parses_and_applies_quick_defaults(monkeypatch):
    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        return demo.DemoResult(image_size=kwargs["image_size"], stride=kwargs["stride"],
                               runs=kwargs["runs"], warmup=kwargs["warmup"])

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", "--quick"]) == 0
    assert (seen["image_size"], seen["runs"], seen["warmup"], seen["stride"]) == (
        demo.QUICK_IMAGE_SIZE, 5, 1, 2)
    assert main(["demo", "--image-size", "256", "--stride", "4", "--runs", "7", "--warmup", "0",
                 "--implementation", "masked", "--min-image-tokens", "64"]) == 0
    assert (seen["image_size"], seen["stride"], seen["runs"], seen["warmup"]) == (256, 4, 7, 0)
    assert (seen["implementation"], seen["min_image_tokens"]) == ("masked", 64)


@pytest.mark.parametrize("argv", [
    ["demo", "--runs", "3"],
    ["demo", "--stride", "0"],
    ["demo", "--warmup", "-1"],
    ["demo", "--implementation", "fast"],
    [],
])
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_cli_rejects_image_size_not_multiple_of_patch(capsys):
    assert main(["demo", "--image-size", "100"]) == 2
    assert "multiple of 16" in capsys.readouterr().out
