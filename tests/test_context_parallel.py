"""Grid attention under diffusers' context parallelism (Ulysses), on gloo with 2 and 4 local processes.

Each rank holds one contiguous chunk of the tokens (the split hook's ``chunk``) and Ulysses' all-to-all
gathers the sequence for a share of the heads around each attention; the layout proof follows both
(layout/collectives.py), so every site rewritten in one process is rewritten on every rank and the
output equals the one-process gridded output. With grid-group sharding (``group_stride``) each rank
holds whole grid groups and every gridded site runs on them with no collective. Collectives are
counted in the graphs as the pass leaves them (the model runs as one graph; CommDebugMode cannot see
inside compiled code) and, with CommDebugMode, over an eager call of the same model.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("gridattn_fx")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import gridattn_fx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cp_worker.py")
GRID = '{"stride": 2, "min_image_tokens": 0}'
MIXED = ('{"stride": 2, "min_image_tokens": 0, "exclude": ["blocks\\\\.1\\\\.attn1"], '
         '"sites": {"blocks.0.attn1": {"grouping": ["grid", "window"]}}}')
TIMEOUT = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(tmp, model, options):
    """The one-process run of ``model`` with ``options``."""
    path = tmp / f"{model}-single-{abs(hash(options))}.pt"
    single = subprocess.run([sys.executable, WORKER, str(path), "--model", model, "--options", options],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
    return torch.load(path, weights_only=False)


def _run_ranks(world, command):
    """Start ``world`` ranks (``command(rank, port)`` is each one's argv); returns [(returncode, log)]."""
    port = _free_port()
    ranks = [subprocess.Popen(command(r, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    return [(p.returncode, log) for p, log in zip(ranks, logs)]


def _launch(tmp, model, world, options, group=None):
    """Run ``world`` ranks and the one-process reference; returns (per-rank results, reference)."""
    tag = f"{model}-{world}-{abs(hash((options, group)))}"
    extra = ["--group", group] if group else []
    runs = _run_ranks(world, lambda r, port: [
        sys.executable, WORKER, str(tmp / f"{tag}-{r}.pt"), "--model", model, "--rank", str(r), "--world", str(world),
        "--port", str(port), "--options", options, *extra])
    for returncode, log in runs:
        assert returncode == 0, log[-4000:]
    return [torch.load(tmp / f"{tag}-{r}.pt", weights_only=False) for r in range(world)], _single(tmp, model, options)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("cp")


def _decisions(result):
    return sorted((path, decision) for path, decision, _ in result["reports"])


def _self_attention(result):
    return {path: (decision, reason) for path, decision, reason in result["reports"] if path.endswith("attn1")}


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_video_rewrites_the_one_process_sites_with_the_same_output(tmp, world):
    ranks, single = _launch(tmp, "wan", world, GRID)
    assert [d for d, _ in _self_attention(single).values()] == ["rewritten", "rewritten"]
    for result in ranks:
        assert _decisions(result) == _decisions(single)
        assert "1x2x2" in _self_attention(result)["blocks.0.attn1"][1]  # the (T, H, W) grid, not a 2-D one
        # the gathered sequence is gridded exactly as in one process: float32, same kernels
        assert (result["out"] - single["out"]).abs().max().item() <= 1e-5
        # one graph per rank; its collectives are the engine's: 4 all-to-alls per self-attention
        # (q, k, v, out), the output gather; the eager call runs exactly those
        assert result["graphs"] == 1
        assert result["collectives"] == {"all_to_all_single": 8, "all_gather_into_tensor": 1}
        assert result["eager_collectives"] == result["collectives"]


def test_ulysses_with_prefix_tokens(tmp):
    """A cls and a register token before the image: rank 0's chunk starts with them, rank 1's is all image."""
    ranks, single = _launch(tmp, "vit-cls", 2, GRID)
    assert _decisions(single) == [("blocks.0.attn", "rewritten"), ("blocks.1.attn", "rewritten")]
    for result in ranks:
        assert _decisions(result) == _decisions(single)
        assert (result["out"] - single["out"]).abs().max().item() <= 1e-5
        assert result["eager_collectives"] == result["collectives"] == {"all_to_all_single": 8,
                                                                        "all_gather_into_tensor": 1}


def test_ulysses_with_sites_left_dense(tmp):
    """An excluded site stays dense everywhere; per-head groupings cannot apply to a rank's share of
    the heads, so that site stays dense under Ulysses (with the reason), gridded in one process."""
    ranks, single = _launch(tmp, "wan", 2, MIXED)
    one = _self_attention(single)
    assert one["blocks.0.attn1"][0] == "rewritten" and "grid|window" in one["blocks.0.attn1"][1]
    assert one["blocks.1.attn1"][0] == "skipped"
    dense, _ = _launch(tmp, "wan", 2, '{"stride": 1}')
    for result, reference in zip(ranks, dense):
        sites = _self_attention(result)
        assert sites["blocks.1.attn1"] == one["blocks.1.attn1"]
        assert sites["blocks.0.attn1"][0] == "skipped"
        assert "share of the heads" in sites["blocks.0.attn1"][1]
        # both sites dense: the engine's dense output
        assert (result["out"] - reference["out"]).abs().max().item() <= 1e-5


class _ChunkedAttention(nn.Module):
    """Attention over one chunk of an image's tokens, as ring attention's local step sees it."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 2, 2)
        self.heads = heads

    def forward(self, img):
        x = self.embed(img).flatten(2).transpose(1, 2)
        local = x.chunk(2, dim=1)[1]
        q = local.unflatten(2, (self.heads, -1)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)


def test_a_chunk_of_the_sequence_is_left_dense():
    model = _ChunkedAttention().eval()
    img = torch.randn(1, 3, 16, 16)
    gm, report = gridattn_fx.rewrite(model, (img,), stride=2, min_image_tokens=0)
    (site,) = report.sites
    assert site.decision == "skipped"
    assert "chunk 1 of 2" in site.reason and "ulysses" in site.reason.lower()
    torch.testing.assert_close(gm(img), model(img))


@pytest.mark.parametrize("world", [2, 4])
def test_grid_group_sharding_runs_gridded_sites_without_collectives(tmp, world):
    """4 grid groups of stride (1, 2, 2) over 2 or 4 ranks: each rank attends within its own groups,
    for all heads; only the output gather is left. The output is the one-process gridded output."""
    ranks, single = _launch(tmp, "wan", world, GRID, group="[1, 2, 2]")
    for result in ranks:
        sites = _self_attention(result)
        assert [d for d, _ in sites.values()] == ["rewritten", "rewritten"]
        assert all("own grid groups" in reason for _, reason in sites.values())
        assert (result["out"] - single["out"]).abs().max().item() <= 1e-5
        assert result["collectives"] == {"all_gather_into_tensor": 1}
        assert result["eager_collectives"] == {"all_to_all_single": 8, "all_gather_into_tensor": 1}


def test_grid_group_sharding_keeps_the_exchange_of_dense_sites(tmp):
    """A site left dense keeps Ulysses' all-to-all pair (dense attention is exact in group order)."""
    options = '{"stride": 2, "min_image_tokens": 0, "exclude": ["blocks\\\\.1\\\\.attn1"]}'
    ranks, single = _launch(tmp, "wan", 2, options, group="[1, 2, 2]")
    assert _self_attention(single)["blocks.1.attn1"][0] == "skipped"
    for result in ranks:
        sites = _self_attention(result)
        assert sites["blocks.0.attn1"][0] == "rewritten" and sites["blocks.1.attn1"][0] == "skipped"
        assert (result["out"] - single["out"]).abs().max().item() <= 1e-5
        assert result["collectives"] == {"all_to_all_single": 4, "all_gather_into_tensor": 1}


def test_grid_group_sharding_errors():
    from diffusers import ContextParallelConfig

    from cp_worker import wan

    model, _ = wan()
    with pytest.raises(ValueError, match="do not split evenly over 4 ranks"):
        gridattn_fx.context_parallel(model, ContextParallelConfig(ulysses_degree=4), group_stride=(1, 1, 2))
    with pytest.raises(ValueError, match="attention heads do not split"):
        gridattn_fx.context_parallel(model, ContextParallelConfig(ulysses_degree=8), group_stride=(2, 2, 2))
    with pytest.raises(ValueError, match="Ulysses only"):
        gridattn_fx.context_parallel(model, ContextParallelConfig(ring_degree=2), group_stride=2)
    with pytest.raises(TypeError, match="diffusers model"):
        gridattn_fx.context_parallel(nn.Linear(2, 2), ContextParallelConfig(ulysses_degree=2))


def test_grid_group_sharding_refuses_masked_attention(tmp):
    """Group-major order changes which token pairs a mask written in the model's order keeps: an
    error, not a silently different result (the engine's dense exchange would apply the mask to
    other pairs). diffusers itself refuses causal attention under context parallelism."""
    runs = _run_ranks(2, lambda r, port: [
        sys.executable, WORKER, str(tmp / f"masked-{r}.pt"), "--model", "wan-masked", "--rank", str(r), "--world", "2",
        "--port", str(port), "--options", GRID, "--group", "[1, 2, 2]"])
    for returncode, log in runs:
        assert returncode != 0
        assert "is masked (attn_mask or position bias) and runs on tokens that grid-group sharding" in log, log[-4000:]


def test_grid_group_sharding_runs_the_grid_grouping_only(tmp):
    """A site configured for window groups keeps the engine's exchange (dense, with the reason):
    the local form computes grid groups only. Its output is the one-process output with that site
    left dense."""
    window = '{"stride": 2, "min_image_tokens": 0, "sites": {"blocks.0.attn1": {"grouping": "window"}}}'
    ranks, _ = _launch(tmp, "wan", 2, window, group="[1, 2, 2]")
    dense_there = _single(tmp, "wan", '{"stride": 2, "min_image_tokens": 0, "exclude": ["blocks\\\\.0\\\\.attn1"]}')
    for result in ranks:
        sites = _self_attention(result)
        assert sites["blocks.0.attn1"][0] == "skipped" and "grid grouping only" in sites["blocks.0.attn1"][1]
        assert sites["blocks.1.attn1"][0] == "rewritten"
        assert result["collectives"] == {"all_to_all_single": 4, "all_gather_into_tensor": 1}
        assert (result["out"] - dense_there["out"]).abs().max().item() <= 1e-5


# -- torch's context parallelism (gridattn_fx.GroupSharding) ------------------------------------------

TORCH_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cp_torch_worker.py")
TORCH_GRID = '{"stride": [1, 2, 2], "min_image_tokens": 0}'


def _launch_torch(tmp, world, options, extra=()):
    """``world`` ranks under torch's context parallelism and the one-process run (tokens declared)."""
    tag = f"torch-{world}-{abs(hash((options, extra)))}"
    runs = _run_ranks(world, lambda r, port: [
        sys.executable, TORCH_WORKER, str(tmp / f"{tag}-{r}.pt"), "--rank", str(r), "--world", str(world),
        "--port", str(port), "--options", options, *extra])
    for returncode, log in runs:
        assert returncode == 0, log[-4000:]
    single = subprocess.run([sys.executable, TORCH_WORKER, str(tmp / f"{tag}-single.pt"), "--options", options,
                             *extra], capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
    return ([torch.load(tmp / f"{tag}-{r}.pt", weights_only=False) for r in range(world)],
            torch.load(tmp / f"{tag}-single.pt", weights_only=False))


@pytest.mark.parametrize("world", [2, 4])
def test_torch_context_parallel_group_sharding_runs_gridded_sites_without_collectives(tmp, world):
    """A 2 x 8 x 8 video's 4 groups of stride (1, 2, 2) over 2 or 4 ranks, cut by torch's own shard
    with the group-major load balancer: every site attends within the rank's own groups, with none
    of torch's all-gathers (2 per site in the eager call). The output, gathered by torch's unshard, is
    the one-process gridded output."""
    ranks, single = _launch_torch(tmp, world, TORCH_GRID)
    assert [d for _, d, _ in single["reports"]] == ["rewritten", "rewritten"]
    for result in ranks:
        assert [d for _, d, _ in result["reports"]] == ["rewritten", "rewritten"]
        assert all("own grid groups" in reason and "DTensor" in reason for _, _, reason in result["reports"])
        assert (result["out"] - single["out"]).abs().max().item() <= 1e-5
        assert result["graphs"] == 1
        assert result["eager_collectives"] == {"all_gather_into_tensor": 4}
        assert result["collectives"] == {}


def test_torch_context_parallel_keeps_the_exchange_of_dense_sites(tmp):
    """An excluded site keeps torch's DTensor attention (its all-gather of k and v): exact in group order."""
    options = '{"stride": [1, 2, 2], "min_image_tokens": 0, "exclude": ["blocks\\\\.1"]}'
    ranks, single = _launch_torch(tmp, 2, options)
    assert [d for _, d, _ in single["reports"]] == ["rewritten", "skipped"]
    for result in ranks:
        decisions = {path: (d, reason) for path, d, reason in result["reports"]}
        assert decisions["blocks.0"][0] == "rewritten" and decisions["blocks.1"][0] == "skipped"
        assert (result["out"] - single["out"]).abs().max().item() <= 1e-5
        assert result["collectives"] == {"all_gather_into_tensor": 2}


def test_torch_context_parallel_dense_sites_return_the_query_chunk(tmp):
    """At 2048 tokens on 4 ranks DTensor's attention returns its output sharded over the heads;
    torch's output hook unwraps it as it is (the query chunk's size, other contents). Under
    GroupSharding.attention() the output is redistributed to the tokens first: dense sites equal the
    one-process output, and gridded sites still run on the rank's own groups."""
    extra = ("--grid", "2,32,32", "--width", "128")
    dense, single = _launch_torch(tmp, 4, '{"stride": 1}', extra)
    for result in dense:
        assert [d for _, d, _ in result["reports"]] == ["skipped", "skipped"]
        assert (result["out"] - single["out"]).abs().max().item() <= 1e-5
        assert result["collectives"]  # torch's exchange ran
    gridded, single = _launch_torch(tmp, 4, TORCH_GRID, extra)
    for result in gridded:
        assert [d for _, d, _ in result["reports"]] == ["rewritten", "rewritten"]
        assert (result["out"] - single["out"]).abs().max().item() <= 1e-5
        assert result["collectives"] == {}


def test_torch_context_parallel_without_group_sharding_stays_dense(tmp):
    """Under torch's own context_parallel each rank's graph sees a chunk it cannot prove anything
    about: every site stays dense (torch's DTensor attention), the report says how to shard by
    groups, and the output is the model's."""
    runs = _run_ranks(2, lambda r, port: [
        sys.executable, TORCH_WORKER, str(tmp / f"plain-{r}.pt"), "--plain", "--rank", str(r), "--world", "2",
        "--port", str(port), "--options", TORCH_GRID])
    for r, (returncode, log) in enumerate(runs):
        assert returncode == 0, log[-4000:]
        result = torch.load(tmp / f"plain-{r}.pt", weights_only=False)
        assert [d for _, d, _ in result["reports"]] == ["skipped", "skipped"]
        assert all("GroupSharding" in reason for _, _, reason in result["reports"])
        assert (result["out"] - result["dense"]).abs().max().item() <= 1e-5


class _Mesh:
    """What GroupSharding reads of a device mesh before any collective."""

    ndim, device_type = 1, "cpu"

    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def test_torch_group_sharding_errors():
    with pytest.raises(ValueError, match="do not split evenly over 8 ranks"):
        gridattn_fx.GroupSharding(_Mesh(8), grid=(2, 8, 8), stride=(1, 2, 2))
    with pytest.raises(ValueError, match="does not divide the token grid"):
        gridattn_fx.GroupSharding(_Mesh(2), grid=(8, 6), stride=(4, 4))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(T, H, W\)"):
        gridattn_fx.GroupSharding(_Mesh(2), grid=(8, 8), stride=(2, 2, 2))
    sharding = gridattn_fx.GroupSharding(_Mesh(2), grid=(4, 4), stride=(2, 2))
    with pytest.raises(ValueError, match="not the 16 image tokens"):
        sharding.shard(torch.zeros(1, 17, 8))
    # the order is group-major: group (0, 0)'s tokens, then (0, 1)'s, ... each row-major
    assert sharding.order().tolist() == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    assert torch.equal(sharding.order()[sharding.order(restore=True)], torch.arange(16))
