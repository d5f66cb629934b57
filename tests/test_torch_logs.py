"""The report and the rewritten graph under torch's logging: TORCH_LOGS names and TORCH_TRACE
(structured trace, what tlparse reads) artifacts."""

import glob
import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest

gridattn_fx = pytest.importorskip("gridattn_fx")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
ENTRY_POINT = "gridattn_fx_torch_logs:register"

# A compiled tiny ViT with one rewritten site, in a fresh interpreter (TORCH_LOGS is read at import).
SCRIPT = textwrap.dedent("""
    import torch
    import gridattn_fx
    from models import ViT, build, image
    model, x = build(ViT, depth=1, grid=(8, 8)), image(1, 16, 16)
    if {compile}:
        with torch.no_grad():
            torch.compile(model, backend="gridattn", options={{"stride": 2, "min_image_tokens": 0}})(x)
    else:
        gridattn_fx.rewrite(model, (x,), stride=2, min_image_tokens=0)
    assert gridattn_fx.last_report().rewritten, gridattn_fx.last_report()
    print("RAN")
""")


def _entry_point_dir(tmp_path):
    """The torch.backends entry point (pyproject.toml) as an installed package would declare it.
    An environment whose gridattn-fx metadata predates it (an editable install made earlier) gets
    it from a minimal dist-info directory on PYTHONPATH, so the test runs the real mechanism."""
    installed = any(ep.value == ENTRY_POINT for ep in importlib.metadata.entry_points(group="torch.backends"))
    if installed:
        return []
    info = tmp_path / "ep" / "gridattn_fx_entry_point-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: gridattn-fx-entry-point\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[torch.backends]\ngridattn_logs = {ENTRY_POINT}\n")
    return [str(tmp_path / "ep")]


def _run(tmp_path, env_extra, compile_it):
    env = dict(os.environ)
    env.pop("TORCH_LOGS", None)
    env.pop("TORCH_TRACE", None)
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, *_entry_point_dir(tmp_path)])
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(compile=compile_it)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "RAN" in proc.stdout, proc.stderr[-3000:]
    return proc.stderr


def test_names_are_registered_with_torch_logging():
    from torch._logging._internal import log_registry

    assert log_registry.is_log("gridattn")
    assert log_registry.log_alias_to_log_qnames["gridattn"] == ["gridattn_fx"]
    assert log_registry.is_artifact("gridattn_report") and log_registry.is_artifact("gridattn_graph")


def test_pyproject_declares_the_entry_point():
    from test_packaging import _pyproject

    project = _pyproject()
    assert project["project"]["entry-points"]["torch.backends"] == {"gridattn_logs": ENTRY_POINT}
    assert "gridattn_fx_torch_logs" in project["tool"]["setuptools"]["py-modules"]


def test_torch_logs_and_torch_trace_show_report_and_rewritten_graph(tmp_path):
    trace_dir = tmp_path / "trace"
    err = _run(tmp_path, {"TORCH_LOGS": "+gridattn", "TORCH_TRACE": str(trace_dir)}, compile_it=True)
    # TORCH_LOGS="+gridattn": the report and the rewritten graph, through torch's log handler
    assert "[__gridattn_report] gridattn rewrite report:" in err
    assert "blocks.0.attn" in err and "rewritten" in err
    assert "[__gridattn_graph] gridattn rewritten graph:" in err
    # TORCH_TRACE: both as artifacts of the compiled frame, with their payloads
    (trace_file,) = glob.glob(str(trace_dir / "*.log"))
    text = open(trace_file).read()
    for name in ("gridattn_report", "gridattn_rewritten_graph"):
        line = next(line for line in text.splitlines() if f'"name": "{name}"' in line)
        assert '"frame_id": 0' in line and '"has_payload"' in line, line
    assert "\t1 attention sites: 1 rewritten, 0 skipped" in text
    assert "\tclass GraphModule(torch.nn.Module):" in text


def test_artifact_name_alone_shows_only_that_artifact(tmp_path):
    err = _run(tmp_path, {"TORCH_LOGS": "gridattn_report"}, compile_it=False)
    assert "gridattn rewrite report:" in err
    assert "gridattn rewritten graph" not in err
