"""One process of the torch context-parallel tests (tests/test_context_parallel.py).

    python tests/cp_torch_worker.py OUT --rank R --world P --port PORT [--options JSON]   # GroupSharding
    python tests/cp_torch_worker.py OUT [--options JSON]          # one process, tokens declared
    python tests/cp_torch_worker.py OUT --plain --rank R --world P --port PORT  # torch's context_parallel as is

A small video transformer over 2 x 8 x 8 tokens (the same weights on every rank) whose attention is
``F.scaled_dot_product_attention``. On P ranks the tokens are cut by torch's own context-parallel
shard with gridattn_fx.GroupSharding's group-major load balancer, the model runs under torch's
context-parallel SDPA, compiled with the gridattn backend, and the chunks are gathered back. Writes
(torch.save): the output, the report's decisions and the collectives counted with CommDebugMode over
an eager call of the model and over an eager run of each graph as the pass left it (compiled code
hides collectives from CommDebugMode; these graphs are exactly what the compiled calls run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GRID, STRIDE, WIDTH = (2, 8, 8), (1, 2, 2), 32


def model_and_tokens(width=32):
    from benchmarks.parallel import TokenTransformer  # the benchmark's model, smaller

    torch.manual_seed(0)
    model = TokenTransformer(dim=width, heads=4, depth=2).eval()
    tokens = torch.randn(1, GRID[0] * GRID[1] * GRID[2], width, generator=torch.Generator().manual_seed(1))
    return model, tokens


def _counts(comm) -> dict:
    return {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}


def run_plain(out_path, options, rank, world, port):
    """torch's public context_parallel (its own contiguous shard, no grid groups): every site stays
    dense, through torch's DTensor attention; the output is the model's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import gridattn_fx

    torch.set_num_threads(1)
    model, tokens = model_and_tokens()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    compiled = torch.compile(model, backend="gridattn", options=options, dynamic=False)
    with torch.no_grad():
        dense = model(tokens)
        local = tokens.clone()
        with context_parallel(mesh, buffers=[local], buffer_seq_dims=[1]), sdpa_kernel(SDPBackend.MATH):
            out_local = compiled(local)
        (out,) = context_parallel_unshard(mesh, [out_local], [1])
    torch.save({"out": out, "dense": dense,
                "reports": [(s.module_path, s.decision, s.reason) for r in gridattn_fx.report_history() for s in r.sites]},
               out_path)
    dist.destroy_process_group()


def run(out_path, options, rank=0, world=1, port=None):
    from torch.distributed.tensor.debug import CommDebugMode

    import gridattn_fx
    from gridattn_fx.frontends import backend as backend_module

    torch.set_num_threads(1)
    model, tokens = model_and_tokens(WIDTH)
    graphs = []
    passed = backend_module.apply_pass

    def recording(gm, example_inputs, *args, **kwargs):  # the graphs as the pass leaves them
        new_gm, report = passed(gm, example_inputs, *args, **kwargs)
        graphs.append((new_gm, list(example_inputs)))
        return new_gm, report

    backend_module.apply_pass = recording
    compiled = torch.compile(model, backend="gridattn", options=options, dynamic=False)
    result = {}
    if port is None:
        from gridattn_fx import ImageTokens

        gridattn_fx.prepare(model, (tokens,), x=ImageTokens(frames=GRID[0], height=GRID[1], width=GRID[2]))
        with torch.no_grad():
            out = compiled(tokens)
    else:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        sharding = gridattn_fx.GroupSharding(init_device_mesh("cpu", (world,)), grid=GRID, stride=STRIDE)
        with torch.no_grad(), sharding.attention():
            local = sharding.shard(tokens, dim=1)
            with CommDebugMode() as comm:  # eager: every collective one call runs
                model(local)
            result["eager_collectives"] = _counts(comm)
            out_local = compiled(local)
            again = compiled(sharding.shard(tokens, dim=1))  # a new shard object: the same compiled variant
            assert torch.equal(out_local, again)
            with CommDebugMode() as comm:
                for gm, example_inputs in graphs:
                    gm(*example_inputs)
            result["collectives"] = _counts(comm)
        out = sharding.unshard(out_local, dim=1)
    result.update(out=out, graphs=len(graphs),
                  reports=[(s.module_path, s.decision, s.reason) for r in gridattn_fx.report_history() for s in r.sites])
    torch.save(result, out_path)
    if port is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int)
    parser.add_argument("--options", default='{"stride": [1, 2, 2], "min_image_tokens": 0}')
    parser.add_argument("--plain", action="store_true", help="torch's context_parallel without grid groups")
    parser.add_argument("--grid", default="2,8,8", help="the token grid T,H,W")
    parser.add_argument("--width", type=int, default=32, help="model width (4 heads)")
    a = parser.parse_args()
    GRID, WIDTH = tuple(int(n) for n in a.grid.split(",")), a.width
    (run_plain if a.plain else run)(a.out, json.loads(a.options), a.rank, a.world, a.port)
