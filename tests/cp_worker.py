"""One process of the context-parallel tests (tests/test_context_parallel.py) and benchmark.

    python tests/cp_worker.py OUT --model wan --rank R --world P --port PORT [--ring] [--options JSON]
    python tests/cp_worker.py OUT --model wan [--options JSON]          # the same forward, one process

Builds a small diffusers model (the same weights on every rank), enables diffusers' context
parallelism through gridattn_fx.context_parallel (Ulysses, or ring with --ring), compiles it with
the gridattn backend and runs one forward. Writes to OUT (torch.save): the output, the report's
decisions, and the collectives the compiled graphs call (counted in every graph the backend was
given: each call of a graph runs each of its collective nodes once; CommDebugMode cannot see inside
compiled code, so the same count is taken over an eager call, with it, to show none is missed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT_TOKENS = 8


def wan(frames: int = 4):
    from gridattn_fx.zoo import _diffusers

    torch.manual_seed(0)
    model, args = _diffusers.build("wan", small=True, num_attention_heads=4)
    hidden, timestep, text, _, _ = args
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, hidden.shape[1], frames, 16, 16, generator=g)
    return model.eval(), (hidden, timestep, torch.randn(1, TEXT_TOKENS, text.shape[-1], generator=g), None, False)


class _Processor:
    """Attention through diffusers' dispatcher, which runs Ulysses / ring under context parallelism."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        q, k, v = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = dispatch_attention_fn(q, k, v, parallel_config=self._parallel_config)
        return attn.to_out[0](out.flatten(2, 3))


def vit_cls():
    """A ViT with a cls and a register token before an 8 x 8 image (66 tokens: 33 per rank at P = 2)."""
    from diffusers import ModelMixin
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
    from diffusers.models.attention_processor import Attention

    class Block(nn.Module):
        def __init__(self, dim, heads):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.attn = Attention(dim, heads=heads, dim_head=dim // heads, bias=True, processor=_Processor())
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            x = x + self.attn(self.norm(x))
            return x + self.mlp(x)

    class CPViT(ModelMixin):
        _cp_plan = {"blocks.0": {"x": ContextParallelInput(split_dim=1, expected_dims=3)},
                    "norm": ContextParallelOutput(gather_dim=1, expected_dims=3)}

        def __init__(self, dim=32, heads=4, depth=2):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, dim, 2, 2)
            self.prefix = nn.Parameter(torch.randn(1, 2, dim))
            self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)

        def forward(self, img):
            x = self.patch_embed(img).flatten(2).transpose(1, 2)
            x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    torch.manual_seed(0)
    model = CPViT().eval()
    return model, (torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)


def wan_masked():
    """Wan whose self-attention takes a mask over the whole sequence in the model's token order."""
    import diffusers.models.transformers.transformer_wan as transformer_wan

    dispatch = transformer_wan.dispatch_attention_fn

    def masked_self_attention(q, k, v, *args, **kwargs):
        if q.shape[1] == k.shape[1]:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            tokens = q.shape[1] * world
            kwargs["attn_mask"] = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None]
        return dispatch(q, k, v, *args, **kwargs)

    transformer_wan.dispatch_attention_fn = masked_self_attention  # this process only
    return wan()


MODELS = {"wan": wan, "wan-2frames": lambda: wan(frames=2), "vit-cls": vit_cls, "wan-masked": wan_masked}


def collectives_in(graphs) -> tuple[dict[str, int], int]:
    """The collective calls in ``graphs`` and the bytes this rank sends through them."""
    from gridattn_fx.ir.values import value_of
    from gridattn_fx.layout.collectives import collective_name

    counts, sent = {}, 0
    for gm in graphs:
        for node in gm.graph.nodes:
            name = collective_name(node)
            if name is not None and name != "wait_tensor":
                counts[name] = counts.get(name, 0) + 1
                value = value_of(node.args[0])
                sent += value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
    return counts, sent


def run(out_path, model_name, options, rank=0, world=1, port=None, ring=False, group=None):
    from torch.distributed.tensor.debug import CommDebugMode

    import gridattn_fx

    torch.set_num_threads(1)
    model, args = MODELS[model_name]()
    if port is not None:
        import torch.distributed as dist
        from diffusers import ContextParallelConfig

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        config = ContextParallelConfig(ring_degree=world) if ring else ContextParallelConfig(ulysses_degree=world)
        gridattn_fx.context_parallel(model, config, group_stride=group)
    graphs = []
    from gridattn_fx.frontends import backend as backend_module

    passed = backend_module.apply_pass

    def recording(*args, **kwargs):  # the graphs as the pass leaves them: what each call runs
        new_gm, report = passed(*args, **kwargs)
        graphs.append(new_gm)
        return new_gm, report

    backend_module.apply_pass = recording

    def counting(gm, example_inputs):
        return gridattn_fx.backend(gm, example_inputs, options=options)

    with torch.no_grad(), CommDebugMode() as comm:  # eager: every collective one step runs
        model(*args)
    eager = {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}
    gridattn_fx.report_history(clear=True)
    compiled = torch.compile(model, backend=counting, dynamic=False)
    with torch.no_grad():
        out = compiled(*args)
        again = compiled(*args)
    out, again = (o[0] if isinstance(o, (tuple, list)) else o for o in (out, again))
    assert torch.equal(out, again)
    reports = [(s.module_path, s.decision, s.reason) for r in gridattn_fx.report_history() for s in r.sites]
    collectives, sent = collectives_in(graphs)
    torch.save({"out": out, "reports": reports, "eager_collectives": eager, "collectives": collectives,
                "bytes": sent, "graphs": len(graphs)}, out_path)
    if port is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--model", default="wan", choices=sorted(MODELS))
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int)
    parser.add_argument("--ring", action="store_true")
    parser.add_argument("--group", type=json.loads, help="grid-group sharding: the group stride (JSON)")
    parser.add_argument("--options", default='{"stride": 2, "min_image_tokens": 0}')
    a = parser.parse_args()
    run(a.out, a.model, json.loads(a.options), a.rank, a.world, a.port, a.ring, a.group)
