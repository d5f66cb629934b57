"""``python -m gridattn_fx report``: --list, module:callable, and one-line errors for bad input."""

import os
import subprocess
import sys

import pytest

from models import ViT, build, image
from oracle import assert_close64, oracle_mode

gridattn_fx = pytest.importorskip("gridattn_fx")
from gridattn_fx import zoo  # noqa: E402
from gridattn_fx.__main__ import main  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vit(depth=1):
    """A ``module:callable`` for the report command: (model, example_inputs)."""
    return build(ViT, depth=depth, grid=(8, 8)), (image(1, 16, 16),)


def test_report_list_names_every_zoo_model(capsys):
    assert main(["report", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == zoo.names()


def test_report_takes_module_callable_with_options(capsys):
    assert main(["report", "test_cli:tiny_vit", "--model-option", "depth=2", "--min-image-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test_cli:tiny_vit (module:callable), inputs 1x3x16x16")
    assert "sites found: 2; rewritten: 2; skipped: 0" in out
    # the report describes the graph rewrite() makes of the callable's model: check that graph
    torch_model, inputs = tiny_vit(depth=2)
    gm, report = gridattn_fx.rewrite(torch_model, inputs, preset="vit", min_image_tokens=0)
    assert [s.decision for s in report.sites] == ["rewritten", "rewritten"]
    with oracle_mode(torch_model, (1, 8, 8), stride=2):
        assert_close64(gm(*inputs), torch_model(*inputs))


BAD = [
    # (arguments after "report", words the one-line error must contain)
    ([], "give a model"),
    (["nope"], "neither a zoo model"),
    (["transformers:bogus"], "unknown zoo model 'transformers:bogus'"),
    (["clip-mha", "--stride", "0"], "--stride must be >= 1, got 0"),
    (["clip-mha", "--min-image-tokens", "-1"], "--min-image-tokens must be >= 0"),
    (["clip-mha", "--model-option", "depth"], "--model-option takes KEY=VALUE"),
    (["clip-mha", "--model-option", "no_such_field=1"], "building zoo model 'clip-mha' failed: TypeError"),
    (["no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
    (["test_cli:no_such_function"], "has no attribute 'no_such_function'"),
    (["os:getcwd"], "must return (model, example_inputs)"),
]


@pytest.mark.parametrize("args,words", BAD, ids=[" ".join(a) or "no-model" for a, _ in BAD])
def test_bad_model_or_option_is_one_line_and_exit_2(args, words, capsys):
    assert main(["report", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m gridattn_fx report: error: "), captured.err
    assert words in err[0]
    assert captured.out == ""


def test_bad_option_from_the_shell_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "gridattn_fx", "report", "clip-mha", "--stride", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "python -m gridattn_fx report: error: --stride must be >= 1, got 0"
    assert "Traceback" not in proc.stdout + proc.stderr
