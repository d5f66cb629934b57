"""One process of the DDP test (tests/test_ddp.py): fine-tune steps through the gridattn backend.

    python tests/ddp_worker.py OUT --rank R --world 2 --port P    # one DDP rank (gloo, loopback)
    python tests/ddp_worker.py OUT --single                        # the same steps, one process

Every rank sees its half of a fixed global batch; the single process sees all of it, so DDP's
averaged gradients must equal the single process's gradients. Writes the reports and gradients
of every step to OUT (torch.save).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import ViT  # noqa: E402

GLOBAL_BATCH = 4
STEPS = 2
OPTIONS = {"stride": 2, "min_image_tokens": 0, "distributing": "shuffle", "fallback_random": True}


def build_model():
    torch.manual_seed(0)
    # ~2.6 MB of float64 parameters: with bucket_cap_mb=1 DDP's optimizer splits the graph
    return ViT(dim=64, heads=4, depth=6, n_cls=1, grid=(8, 8)).double()


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
    target = torch.randn(GLOBAL_BATCH, 65, 64, generator=g, dtype=torch.float64)
    return x, target


def run(out_path, rank=0, world=1, port=None):
    import gridattn_fx

    torch.set_num_threads(1)
    model = build_model().train()
    if port is not None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        wrapped = DDP(model, bucket_cap_mb=1)
    else:
        wrapped = model
    compiled = torch.compile(wrapped, backend="gridattn", options=OPTIONS, dynamic=False)
    gridattn_fx.report_history(clear=True)
    grads, shard = [], GLOBAL_BATCH // world
    for step in range(STEPS):
        x, target = batch(step)
        x, target = x[rank * shard:(rank + 1) * shard], target[rank * shard:(rank + 1) * shard]
        # the same draw on every rank and in the single process: each site draws one assignment
        # per call, whatever the batch size
        torch.manual_seed(1000 + step)
        loss = (compiled(x) - target).square().mean()
        model.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    reports = [[(s.module_path, s.decision, s.reason, s.stride) for s in r.sites]
               for r in gridattn_fx.report_history()]
    torch.save({"grads": grads, "reports": reports}, out_path)
    if port is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int)
    parser.add_argument("--single", action="store_true")
    args = parser.parse_args()
    if args.single:
        run(args.out)
    else:
        run(args.out, args.rank, args.world, args.port)
