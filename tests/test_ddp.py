"""Fine-tuning under DistributedDataParallel (gloo, 2 processes on loopback) through the backend.

DDPOptimizer splits the captured graph at bucket boundaries (tests/ddp_worker.py picks sizes so it
does); sites in a later piece must still be proven (crossgraph/split_handoff.py) and rewritten exactly
as on one process, and the averaged gradients must equal the single-process gradients.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from oracle import assert_close64

pytest.importorskip("gridattn_fx")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    port = _free_port()
    ranks = [subprocess.Popen([sys.executable, WORKER, str(tmp / f"rank{r}.pt"), "--rank", str(r),
                               "--world", "2", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in ranks]
    for p, log in zip(ranks, logs):
        assert p.returncode == 0, log[-4000:]
    single = subprocess.run([sys.executable, WORKER, str(tmp / "single.pt"), "--single"],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
    load = lambda name: torch.load(tmp / name, weights_only=False)  # noqa: E731
    return [load("rank0.pt"), load("rank1.pt")], load("single.pt")


def _decisions(reports):
    return sorted((path, decision, stride) for report in reports for path, decision, _, stride in report)


def test_ddp_rewrites_the_same_sites_across_bucket_splits(runs):
    ddp, single = runs
    pieces = [r for r in ddp[0]["reports"] if r]
    assert len(single["reports"]) == 1 and len(pieces) >= 2, "DDPOptimizer did not split the graph"
    assert _decisions(ddp[0]["reports"]) == _decisions(single["reports"])
    assert all(decision == "rewritten" for _, decision, _ in _decisions(single["reports"]))
    assert all("shuffle distributing" in reason for report in pieces for _, _, reason, _ in report)
    assert _decisions(ddp[1]["reports"]) == _decisions(ddp[0]["reports"])


def test_ddp_gradients_match_the_single_process_run(runs):
    ddp, single = runs
    for step, want in enumerate(single["grads"]):
        for name, w in want.items():
            assert_close64(ddp[0]["grads"][step][name], w, msg=f"step {step} {name}")
            assert torch.equal(ddp[1]["grads"][step][name], ddp[0]["grads"][step][name])


# ---------------------------------------------------------------------------------------------
# the hand-off itself, without processes
# ---------------------------------------------------------------------------------------------
def _pieces(n_tokens_second):
    """Two graphs as DDPOptimizer would pass them: tokens leave the first as ``tokens``, and the
    second takes a placeholder of that name (of the given sequence length) into attention."""
    import torch.fx as fx
    import torch.nn.functional as F

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 2, 2)

        def forward(self, img):
            return self.conv(img).flatten(2).transpose(1, 2)

    first = fx.symbolic_trace(Embed())
    out = first.graph.output_node().args[0]
    out.name = "tokens"

    graph = fx.Graph()
    tokens = graph.placeholder("tokens")
    q = graph.call_method("unsqueeze", (tokens, 1))
    graph.output(graph.call_function(F.scaled_dot_product_attention, (q, q, q)))
    second = fx.GraphModule(torch.nn.Module(), graph)
    return first, second, torch.randn(1, n_tokens_second, 8)


@pytest.mark.parametrize("length,inherits", [(64, True), (63, False)])
def test_layouts_cross_a_split_only_by_name_and_shape(length, inherits):
    from torch._dynamo.backends.distributed import DDPOptimizerContext
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    import gridattn_fx

    first, second, tokens = _pieces(length)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    ctx = TracingContext(mode)
    ctx.ddp_optimizer_ctx = DDPOptimizerContext()
    with tracing(ctx):
        gridattn_fx.rewrite(first, (torch.randn(1, 3, 16, 16),), min_image_tokens=0)
        _, report = gridattn_fx.rewrite(second, (tokens,), min_image_tokens=0)
    site = report.sites[0]
    assert (site.decision == "rewritten") is inherits, str(report)
    if inherits:
        assert "DDP bucket split" in site.evidence
    # outside a split, nothing is inherited
    _, alone = gridattn_fx.rewrite(second, (tokens,), min_image_tokens=0)
    assert alone.sites[0].decision == "skipped"
