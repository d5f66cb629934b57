"""What a SAM global-attention block's decomposed relative-position bias costs, before and after.

Official SAM ViT-B global block shapes (64x64 tokens, width 768, 12 heads, random weights). For
the original block and for the rewrite (stride 2, grouped and masked implementations) this prints
the largest intermediate tensor of the graph (fake-tensor shape propagation: exact, no timing) and
the peak resident memory of one eager forward, each measured in a fresh subprocess.

    python benchmarks/relpos_bias_cost.py [--tokens 64] [--stride 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
import torch.nn as nn

import gridattn_fx


class SamGlobalAttention(nn.Module):
    """segment_anything.modeling.image_encoder.Attention with use_rel_pos=True, written the same way."""

    def __init__(self, tokens: int, dim: int = 768, heads: int = 12):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.embed = nn.Conv2d(3, dim, 16, 16)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.randn(2 * tokens - 1, dim // heads) * 0.02)
        self.rel_pos_w = nn.Parameter(torch.randn(2 * tokens - 1, dim // heads) * 0.02)

    @staticmethod
    def _rel(size: int, table):
        coords = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
        return table[coords.long()]

    def forward(self, img):
        x = self.embed(img).permute(0, 2, 3, 1)  # NHWC, as in SAM
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.heads, H * W, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        r_q = q.reshape(B * self.heads, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, self._rel(H, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, self._rel(W, self.rel_pos_w))
        attn = (attn.view(B * self.heads, H, W, H, W) + rel_h[:, :, :, :, None]
                + rel_w[:, :, :, None, :]).view(B * self.heads, H * W, H * W)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(B, self.heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def _build(tokens, stride, config):
    torch.manual_seed(0)
    model = SamGlobalAttention(tokens).eval()
    img = torch.randn(1, 3, 16 * tokens, 16 * tokens)
    if config == "original":
        gm, _ = gridattn_fx.rewrite(model, (img,), stride=1)
    else:
        gm, report = gridattn_fx.rewrite(model, (img,), stride=stride, implementation=config, min_image_tokens=0)
        assert report.rewritten, str(report)
    return gm, img


def _largest_intermediate(gm, img) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(img)
    return max(n.meta["val"].numel() * n.meta["val"].element_size() for n in gm.graph.nodes
               if isinstance(n.meta.get("val"), torch.Tensor))


def _child(tokens, stride, config):
    gm, img = _build(tokens, stride, config)
    largest = _largest_intermediate(gm, img)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        gm(img)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"config": config, "largest_bytes": largest, "peak_rss_growth_kib": after - before}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--stride", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.tokens, args.stride, args.child)
    rows = []
    for config in ("original", "masked", "grouped"):
        out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--stride", str(args.stride),
                              "--child", config], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"SAM global attention block, {args.tokens}x{args.tokens} tokens, 12 heads, float32, batch 1, "
          f"stride {args.stride}; torch {torch.__version__}")
    print(f"{'graph':<10} {'largest intermediate':>22} {'peak RSS growth (one forward)':>31}")
    for r in rows:
        print(f"{r['config']:<10} {r['largest_bytes'] / 2**20:>18.1f} MiB {r['peak_rss_growth_kib'] / 2**10:>27.1f} MiB")


if __name__ == "__main__":
    main()
