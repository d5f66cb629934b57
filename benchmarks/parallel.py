"""``python -m benchmarks --cases parallel``: grid attention under diffusers' context parallelism.

A Wan block stack (diffusers' ``WanTransformer3DModel``, 4 heads x 32, every self-attention gridded
at stride (1, 2, 2)) on gloo, one thread per rank, against one process with one thread. Modes:

* ``dense``     diffusers' Ulysses, attention dense (backend gridattn at stride 1);
* ``gridattn``  Ulysses, every self-attention gridded (the engine's all-to-alls kept);
* ``group``     grid-group sharding (``context_parallel(..., group_stride=(1, 2, 2))``): gridded sites
                run on each rank's own groups, no all-to-all;
* ``group+dense``  the same with the first block's self-attention left dense (a quarter of the
                sites at 4 blocks): that site keeps its all-to-all pair.

Each configuration runs in fresh processes (world ranks, or one process for the baselines); the
configurations alternate round by round (``--rounds``) and each reports the median step time of
``--steps`` steps after warm-up; the speedup is the one-process time of the same attention (dense
or gridded, with the same sites left dense) over the ranks' step time (the slowest rank's, per step).
Collectives and bytes are read from the graphs as the pass leaves them, per transformer block (the
output gather is counted apart); ``max_err`` compares rank 0's output with the one-process output.
Prints one ``parallel:`` line per world size and mode, then the 8-GPU cost model (``costmodel:``).

    python -m benchmarks.parallel [--quick] [--worlds 2,4] [--rounds 2] [--out DIR]
    python -m benchmarks.parallel --engine torch [--quick] ...   # torch's context parallelism

``--engine torch``: a 4-block token transformer (128 wide, 4 heads) under torch's context
parallelism through gridattn_fx.GroupSharding (torch's own shard with the group-major load
balancer, torch's DTensor attention for dense sites): ``torch-dense`` at stride 1 (torch's
all-gather of k and v at every site), ``torch-group`` with every site gridded at (1, 2, 2) on the
rank's own groups; the one-process baselines declare the tokens (``prepare``). Collectives and bytes
are counted over an eager run of the graphs as the pass left them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

GROUP = [1, 2, 2]
MODES = {  # mode -> (gridattn options, group stride, one-process baseline)
    "dense": ({"stride": 1}, None, "dense"),
    "gridattn": ({"stride": 2, "min_image_tokens": 0}, None, "grid"),
    "group": ({"stride": 2, "min_image_tokens": 0}, GROUP, "grid"),
    "group+dense": ({"stride": 2, "min_image_tokens": 0, "exclude": [r"blocks\.0\.attn1"]}, GROUP, "grid+dense"),
}
BASELINES = {"dense": MODES["dense"][0], "grid": MODES["gridattn"][0], "grid+dense": MODES["group+dense"][0]}


def build(quick: bool):
    from gridattn_fx.zoo import _diffusers

    layers = 4
    torch.manual_seed(0)
    model, args = _diffusers.build("wan", small=True, num_attention_heads=4, attention_head_dim=32,
                                   num_layers=layers, ffn_dim=256)
    frames, side = (4, 32) if quick else (8, 64)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 4, frames, side, side, generator=g)
    return model.eval(), (hidden, args[1], torch.randn(1, 8, args[2].shape[-1], generator=g), None, False), layers


def _collectives(graphs):
    """(calls, bytes sent) per rank inside the transformer blocks, and the bytes of the rest."""
    from gridattn_fx.ir.module_paths import module_path
    from gridattn_fx.ir.values import value_of
    from gridattn_fx.layout.collectives import collective_name

    calls = sent = rest = 0
    for gm in graphs:
        for node in gm.graph.nodes:
            name = collective_name(node)
            if name is None or name == "wait_tensor":
                continue
            value = value_of(node.args[0])
            size = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
            if module_path(node).startswith("blocks."):
                calls, sent = calls + 1, sent + size
            else:
                rest += size
    return calls, sent, rest


def worker(out, options, group, quick, steps, rank=0, world=1, port=None):
    import torch.distributed as dist

    import gridattn_fx
    from gridattn_fx.frontends import backend as backend_module

    torch.set_num_threads(1)
    model, args, layers = build(quick)
    if world > 1:
        from diffusers import ContextParallelConfig

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        gridattn_fx.context_parallel(model, ContextParallelConfig(ulysses_degree=world), group_stride=group)
    graphs, passed = [], backend_module.apply_pass

    def recording(*a, **k):
        new_gm, report = passed(*a, **k)
        graphs.append(new_gm)
        return new_gm, report

    backend_module.apply_pass = recording
    compiled = torch.compile(model, backend="gridattn", options=options, dynamic=False)
    times = []
    with torch.no_grad():
        for step in range(2 + steps):
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            result = compiled(*args)[0]
            elapsed = torch.tensor([time.perf_counter() - start])
            if world > 1:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank does
            if step >= 2:
                times.append(elapsed.item())
    calls, sent, rest = _collectives(graphs)
    sites = [(s.module_path, s.decision) for r in gridattn_fx.report_history() for s in r.sites]
    if rank == 0:
        torch.save({"out": result, "step_s": statistics.median(times), "calls": calls, "bytes": sent,
                    "other_bytes": rest, "layers": layers, "sites": sites}, out)
    if world > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp, tag, options, group, quick, steps, world, engine="diffusers"):
    path = os.path.join(tmp, f"{tag}-{world}.pt")
    port = _free_port()
    base = [sys.executable, "-m", "benchmarks.parallel", "--worker", path, "--options", json.dumps(options),
            "--steps", str(steps), "--engine", engine] + (["--group", json.dumps(group)] if group else []) + (
            ["--quick"] if quick else [])
    ranks = [subprocess.Popen(base + ["--rank", str(r), "--world", str(world), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=1800)[0] for p in ranks]
    for p, log in zip(ranks, logs):
        if p.returncode != 0:
            raise RuntimeError(f"{tag} world={world} failed:\n{log[-3000:]}")
    return torch.load(path, weights_only=False)


def run(quick: bool, worlds, rounds: int, steps: int, out_dir: str, echo=print):
    echo(f"parallel: Wan stack, {'quick' if quick else 'full'} size, worlds {worlds}, {rounds} round(s) x "
         f"{steps} steps, one thread per rank")
    samples: dict[tuple, list] = {}
    last: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name, options in BASELINES.items():   # one process, one thread
                result = _launch(tmp, f"base-{name}", options, None, quick, steps, 1)
                samples.setdefault(("base", name), []).append(result["step_s"])
                last[("base", name)] = result
            for world in worlds:
                for mode, (options, group, _) in MODES.items():
                    result = _launch(tmp, mode, options, group, quick, steps, world)
                    samples.setdefault((world, mode), []).append(result["step_s"])
                    last[(world, mode)] = result
    rows = []
    dense_bytes = {}
    for world in worlds:
        for mode, (_, _, base) in MODES.items():
            r = last[(world, mode)]
            t = statistics.median(samples[(world, mode)])
            t1 = statistics.median(samples[("base", base)])
            err = (r["out"] - last[("base", base)]["out"]).abs().max().item()
            per_block = r["bytes"] / r["layers"]
            if mode == "dense":
                dense_bytes[world] = per_block
            row = dict(world=world, mode=mode, collectives_per_block=r["calls"] / r["layers"],
                       bytes_per_block=int(per_block), bytes_vs_dense=per_block / dense_bytes[world],
                       gather_bytes=r["other_bytes"], step_ms=round(1000 * t, 1), one_process_ms=round(1000 * t1, 1),
                       speedup_vs_1=round(t1 / t, 2), max_err=f"{err:.1e}")
            rows.append(row)
            echo("parallel: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "parallel.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for line in cost_model():
        echo(line)
    return rows


# --- torch's context parallelism (gridattn_fx.GroupSharding) --------------------------------------

TORCH_MODES = {  # mode -> (gridattn options, one-process baseline); both through GroupSharding
    "torch-dense": ({"stride": 1}, "dense"),
    "torch-group": ({"stride": [1, 2, 2], "min_image_tokens": 0}, "grid"),
}


class TokenBlock(torch.nn.Module):
    """A pre-norm transformer block over tokens with ``F.scaled_dot_product_attention`` in (B, H, L, D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(x)


class TokenTransformer(torch.nn.Module):
    """Takes tokens (B, T*H*W, C), as a model under torch's context parallelism does (the engine
    shards its inputs before the forward)."""

    def __init__(self, dim=128, heads=4, depth=4):
        super().__init__()
        self.blocks = torch.nn.ModuleList([TokenBlock(dim, heads) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def torch_grid(quick: bool) -> tuple:
    return (4, 16, 16) if quick else (8, 32, 32)


def _sent_by_collectives(run) -> tuple[int, int]:
    """(collective calls, bytes this rank sends) while ``run()`` executes eagerly."""
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    counted = [0, 0]

    class Sent(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(issubclass(t, DTensor) for t in types):
                return NotImplemented  # DTensor first desugars into collectives on plain tensors (as CommDebugMode)
            name = func.__name__.split(".")[0]
            if func.namespace == "_c10d_functional" and name != "wait_tensor" and not name.startswith("_"):
                counted[0] += 1
                counted[1] += args[0].numel() * args[0].element_size()
            return func(*args, **(kwargs or {}))

    with Sent():
        run()
    return counted[0], counted[1]


def torch_worker(out, options, quick, steps, rank=0, world=1, port=None):
    import torch.distributed as dist

    import gridattn_fx
    from gridattn_fx.frontends import backend as backend_module

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, grid, layers = TokenTransformer().eval(), torch_grid(quick), 4
    tokens = torch.randn(1, grid[0] * grid[1] * grid[2], 128, generator=torch.Generator().manual_seed(1))
    graphs, passed = [], backend_module.apply_pass

    def recording(gm, example_inputs, *a, **k):
        new_gm, report = passed(gm, example_inputs, *a, **k)
        graphs.append((new_gm, list(example_inputs)))
        return new_gm, report

    backend_module.apply_pass = recording
    compiled = torch.compile(model, backend="gridattn", options=options, dynamic=False)
    context, x = contextlib.nullcontext(), tokens
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        sharding = gridattn_fx.GroupSharding(init_device_mesh("cpu", (world,)), grid=grid, stride=(1, 2, 2))
        context = sharding.attention()
    else:
        gridattn_fx.prepare(model, (tokens,), x=gridattn_fx.ImageTokens(frames=grid[0], height=grid[1], width=grid[2]))
    times = []
    with torch.no_grad(), context:
        for step in range(2 + steps):
            if world > 1:
                x = sharding.shard(tokens, dim=1)
                dist.barrier()
            start = time.perf_counter()
            result = compiled(x)
            elapsed = torch.tensor([time.perf_counter() - start])
            if world > 1:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step >= 2:
                times.append(elapsed.item())
        calls, sent = _sent_by_collectives(lambda: [gm(*inputs) for gm, inputs in graphs])
    if world > 1:
        result = sharding.unshard(result, dim=1)
    sites = [(s.module_path, s.decision, s.reason) for r in gridattn_fx.report_history() for s in r.sites]
    if rank == 0:
        torch.save({"out": result, "step_s": statistics.median(times), "calls": calls, "bytes": sent,
                    "layers": layers, "sites": sites}, out)
    if world > 1:
        dist.destroy_process_group()


def run_torch(quick: bool, worlds, rounds: int, steps: int, out_dir: str, echo=print):
    grid = torch_grid(quick)
    echo(f"parallel: torch's context parallelism (GroupSharding), token transformer over {'x'.join(map(str, grid))} "
         f"tokens, worlds {worlds}, {rounds} round(s) x {steps} steps, one thread per rank")
    samples: dict[tuple, list] = {}
    last: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for mode, (options, base) in TORCH_MODES.items():
                result = _launch(tmp, f"base-{base}", options, None, quick, steps, 1, engine="torch")
                samples.setdefault(("base", base), []).append(result["step_s"])
                last[("base", base)] = result
                for world in worlds:
                    result = _launch(tmp, mode, options, None, quick, steps, world, engine="torch")
                    samples.setdefault((world, mode), []).append(result["step_s"])
                    last[(world, mode)] = result
    rows = []
    for world in worlds:
        for mode, (_, base) in TORCH_MODES.items():
            r, t = last[(world, mode)], statistics.median(samples[(world, mode)])
            t1 = statistics.median(samples[("base", base)])
            err = (r["out"] - last[("base", base)]["out"]).abs().max().item()
            row = dict(engine="torch", world=world, mode=mode, collectives_per_block=r["calls"] / r["layers"],
                       bytes_per_block=int(r["bytes"] / r["layers"]), step_ms=round(1000 * t, 1),
                       one_process_ms=round(1000 * t1, 1), speedup_vs_1=round(t1 / t, 2), max_err=f"{err:.1e}")
            rows.append(row)
            echo("parallel: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "parallel_torch.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


# --- the 8-GPU cost model ------------------------------------------------------------------------

def cost_model(gpus: int = 8, steps: int = 50):
    """HunyuanVideo 720p x 129 frames (33 x 45 x 80 latent tokens after 1 x 2 x 2 patches, 256 text
    tokens; 20 double- and 40 single-stream blocks, width 3072, 24 heads of 128), 50 steps.

    Compute from FLOPs at the rate that reproduces the published 1-GPU Ulysses time (1904 s, H100);
    communication from bytes over NVLink (450 GB/s per direction per H100, fully overlapped with
    nothing: a pessimistic bound). Published, for comparison: 925 s on 2, 514 s on 4, 338 s on 8.
    Grid stride (1, 2, 2): 4 groups; a site on 4 groups costs 1/4 of its dense attention FLOPs."""
    tokens, text, width, blocks = 33 * 45 * 80, 256, 3072, 60
    n = tokens + text
    attention = 4 * n * n * width                # QK^T and PV, per block
    linear = 2 * n * width * width * 12           # q, k, v, out and a 4x MLP, per block
    step_flops = blocks * (attention + linear)
    rate = step_flops * steps / 1904.0            # FLOP/s that reproduce the 1-GPU figure
    nvlink = 450e9
    a2a_bytes = 4 * 2 * n * width * (gpus - 1) / gpus / gpus   # q, k, v, out in bf16, what one GPU sends
    lines = [f"costmodel: HunyuanVideo 720p/129f, {n} tokens, 60 blocks, 50 steps; rate {rate / 1e12:.0f} TFLOP/s "
             "fitted to the published 1-GPU time (measured by others: 1904 s on 1, 338 s on 8 with Ulysses)"]
    for mode, attn_share, exchanged in (("dense Ulysses", 1.0, 1.0), ("gridattn under Ulysses", 0.25, 1.0),
                                        ("grid-group sharding", 0.25, 0.0),
                                        ("grid-group sharding, 1/4 sites dense", 0.25 * 0.75 + 0.25, 0.25)):
        compute = blocks * (attention * attn_share + linear) / gpus / rate * steps
        comm = blocks * exchanged * a2a_bytes / nvlink * steps
        lines.append(f"costmodel: gpus={gpus} mode={mode} compute_s={compute:.0f} comm_s={comm:.0f} "
                     f"total_s={compute + comm:.0f} (modelled, not measured)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.parallel")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worlds", default=None, help="comma-separated world sizes (default 2,4; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over all configurations (default 2; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (default 5; quick 3)")
    p.add_argument("--out", default=None)
    p.add_argument("--engine", choices=("diffusers", "torch"), default="diffusers",
                   help="diffusers' Ulysses (default) or torch's context parallelism with GroupSharding")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--group", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    steps = a.steps or (3 if a.quick else 5)
    if a.worker and a.engine == "torch":
        torch_worker(a.worker, json.loads(a.options), a.quick, steps, a.rank, a.world, a.port)
        return 0
    if a.worker:
        worker(a.worker, json.loads(a.options), json.loads(a.group) if a.group else None, a.quick, steps,
               a.rank, a.world, a.port)
        return 0
    worlds = [int(w) for w in (a.worlds or ("2" if a.quick else "2,4")).split(",")]
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out" if a.quick else "results", "parallel")
    (run_torch if a.engine == "torch" else run)(a.quick, worlds, a.rounds or (1 if a.quick else 2), steps, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
