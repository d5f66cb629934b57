"""Where a measurement runs (gridattn_fx/tools/target.py: ``--device`` / ``--dtype`` of the demo and of
``python -m benchmarks``), and ``scripts/device_check --smoke``, the CPU run of the check a session
runs once when a GPU is lent."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import gridattn_fx.tools.demo as demo
from gridattn_fx.__main__ import main
from gridattn_fx.tools.target import Target, sdpa_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_names_the_bad_option():
    with pytest.raises(ValueError, match="--device must be cpu or cuda"):
        Target.parse("tpu", "float32")
    with pytest.raises(ValueError, match="--dtype must be one of float32, bfloat16, float16"):
        Target.parse("cpu", "float64")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            Target.parse("cuda", "bfloat16")
    assert Target.parse("cpu", "bfloat16") == Target("cpu", torch.bfloat16)


def test_place_inputs_casts_floating_tensors_only():
    target = Target("cpu", torch.bfloat16)
    got = target.place_inputs((torch.randn(2), {"t": torch.tensor([3]), "m": torch.ones(2, dtype=torch.bool)}, 5))
    assert got[0].dtype == torch.bfloat16 and got[1]["t"].dtype == torch.int64
    assert got[1]["m"].dtype == torch.bool and got[2] == 5
    assert target.describe() == "cpu, bfloat16"


def test_sdpa_kernels_names_the_implementation():
    q = torch.randn(1, 2, 16, 8)
    assert sdpa_kernels(lambda: F.scaled_dot_product_attention(q, q, q)) == "cpu-flashx1"
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        assert sdpa_kernels(lambda: F.scaled_dot_product_attention(q, q, q)) == "mathx1"
    assert sdpa_kernels(lambda: q + 1) == ""


def test_demo_in_bfloat16():
    lines = []
    result = demo.run_demo(image_size=128, stride=2, runs=5, warmup=0, min_image_tokens=0,
                           model_kwargs=dict(embed_dim=32, depth=1, num_heads=2), dtype="bfloat16",
                           echo=lines.append)
    text = "\n".join(lines)
    assert result.failure is None and result.rewritten == 1, text
    assert result.device == "cpu, bfloat16" and "Latency on cpu, bfloat16" in text
    assert set(result.sdpa) == {"inductor", "gridattn"} and all(result.sdpa.values()), result.sdpa
    assert all(m > 0 for m in result.peak_mib.values())


def test_demo_cli_rejects_an_unavailable_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is available: --device cuda is valid here")
    assert main(["demo", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().out


def test_device_check_smoke(tmp_path):
    """The whole script on the CPU at tiny sizes: every model within tolerance in bfloat16 and
    float16, the three benchmark cases timed, the CSV written, the last line as promised."""
    run = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "device_check"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert lines[-1].startswith("device_check: PASS correctness 6/6 within tolerance;"), lines[-1]
    for case in ("attn-core 16x16", "sam 256px", "video-block 2x8x8 tokens"):
        assert case in lines[-1]
    csv = (tmp_path / "device_check.csv").read_text().splitlines()
    assert len(csv) == 1 + 6 + 6  # header, 3 models x 2 dtypes, 3 cases x 2 configurations


CPU_CODE = '''
cpp_fused_clone_0 = async_compile.cpp_pybinding(['float*'], r"""...""")
cpp_fused_add_native_layer_norm_1 = async_compile.cpp_pybinding(['float*'], r"""...""")
class Runner:
    def call(self, args):
        cpp_fused_clone_0(buf0, arg0_1)
        buf1 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(buf0, buf0, buf0)
        cpp_fused_add_native_layer_norm_1(buf1)
        return (buf1, )
runner = Runner(partitions=[])
'''

GPU_CODE = '''
triton_poi_fused_clone_0 = async_compile.triton('triton_poi_fused_clone_0', """...""")
triton_per_fused_add_native_layer_norm_1 = async_compile.triton('triton_per_fused_add_native_layer_norm_1', """...""")
def call(args):
    triton_poi_fused_clone_0.run(buf0, arg0_1, 4096, grid=grid(4096), stream=stream0)
    buf1 = torch.ops.aten._scaled_dot_product_flash_attention.default(buf0, buf0, buf0)
    triton_per_fused_add_native_layer_norm_1.run(buf1, 64, grid=grid(64), stream=stream0)
    return (buf1, )
'''


@pytest.mark.parametrize("code", [CPU_CODE, GPU_CODE], ids=["cpp", "triton"])
def test_kernel_counts_read_cpu_and_gpu_code(code):
    """The benchmarks count inductor's kernels (and the copy-only ones among them) in C++ and Triton
    output code alike (benchmarks/common.py)."""
    from benchmarks.common import code_stats

    stats = code_stats([code])
    assert len(stats.kernels) == 2 and len(stats.layout_kernels) == 1, stats
    assert len(stats.extern_calls) == 1, stats
