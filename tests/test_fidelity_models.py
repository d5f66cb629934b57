"""The fidelity benchmark's SAM-like and SegFormer-like models under the gridattn backend.

Small random-weight versions (float64) of the two families: which attention sites the backend
rewrites (the global / spatially reduced ones; SAM's windowed blocks lose their image layout at the
window partition and stay dense), the rewritten model against the oracle (DESIGN.md section 1:
SDPA with the site's own bias plus log M, keys on their own reduced grid), and stride 1 against the
untouched model.
"""

import types

import pytest
import torch

from oracle import assert_close64, assert_differs, assert_equal_exact, oracle_sdpa

gridattn_fx = pytest.importorskip("gridattn_fx")

from benchmarks.fidelity.sam_like import SamLike, add_decomposed_rel_pos  # noqa: E402
from benchmarks.fidelity.segformer_like import SegFormerLike  # noqa: E402

STRIDE = 2


def small_sam() -> SamLike:
    # 32 px -> 16 x 16 tokens, 4 x 4 windows in block 0, global attention in block 1
    model = SamLike(image_size=32, dim=16, depth=2, num_heads=2, mlp_ratio=2.0, window_size=4, global_blocks=(1,))
    with torch.no_grad():  # the rel-pos tables start at zero: make the bias matter
        for name, p in model.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_(0, 0.5)
    return model.double().eval()


def small_segformer() -> SegFormerLike:
    # 32 px -> stage 1: 16 x 16 tokens, keys 4 x 4 (sr 4); stage 2: 8 x 8 tokens, keys 4 x 4 (sr 2)
    model = SegFormerLike(dims=(8, 16), depths=(1, 1), num_heads=(1, 2), sr_ratios=(4, 2), mlp_ratio=2.0, decoder_dim=8)
    return model.double().eval()


def sam_oracle_forward(self, x):
    """SamLike's Attention.forward with the oracle's masked SDPA in place of the dense softmax."""
    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
    bias = add_decomposed_rel_pos(torch.zeros(q.shape[0], H * W, H * W, dtype=q.dtype), q,
                                  self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
    out = oracle_sdpa(q, k, v, attn_mask=bias, scale=self.scale, q_layout=(0, H, W), k_layout=(0, H, W), stride=STRIDE)
    out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(out)


def segformer_oracle_forward(self, x, height, width):
    """EfficientSelfAttention.forward with the oracle: queries on the H x W grid, keys on the reduced one."""
    b, n, c = x.shape
    q = self.heads(self.query(x))
    kv = x.permute(0, 2, 1).reshape(b, c, height, width)
    kv = self.layer_norm(self.sr(kv).reshape(b, c, -1).permute(0, 2, 1))
    k, v = self.heads(self.key(kv)), self.heads(self.value(kv))
    reduced = (0, height // self.sr_ratio, width // self.sr_ratio)
    out = oracle_sdpa(q, k, v, q_layout=(0, height, width), k_layout=reduced, stride=STRIDE)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


CASES = {
    # family: (builder, backend options, {module path: expected decision}, oracle forward)
    "sam": (small_sam, {"preset": "sam", "min_image_tokens": 0},
            {"blocks.0.attn": "skipped", "blocks.1.attn": "rewritten"},
            sam_oracle_forward),
    "segformer": (small_segformer, {"preset": "segformer"},
                  {"stages.0.blocks.0.attn": "rewritten", "stages.1.blocks.0.attn": "rewritten"},
                  segformer_oracle_forward),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_backend_rewrites_global_sites_and_matches_oracle(family):
    build, options, decisions, oracle_forward = CASES[family]
    model = build()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = torch.compile(model, backend="gridattn", options={**options, "stride": STRIDE}, dynamic=False)(x)
    report = gridattn_fx.last_report()
    assert report.failure is None, str(report)
    assert {s.module_path: s.decision for s in report.sites} == decisions, str(report)

    with torch.no_grad():
        dense = model(x)
        for path, decision in decisions.items():
            if decision == "rewritten":
                attn = model.get_submodule(path)
                attn.forward = types.MethodType(oracle_forward, attn)
        expected = model(x)
    assert_differs(expected, dense)
    assert_close64(out.detach(), expected)


@pytest.mark.parametrize("family", sorted(CASES))
def test_stride_one_is_the_untouched_model(family):
    build, options, _, _ = CASES[family]
    model = build()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    gm, report = gridattn_fx.rewrite(model, (x,), **{**options, "stride": 1})
    assert not report.rewritten, str(report)
    with torch.no_grad():
        assert_equal_exact(gm(x), model(x))


@pytest.mark.parametrize("family", ["sam", "segformer"])
def test_committed_family_weights_load_and_are_small(family):
    import os

    from benchmarks.fidelity.evaluate import HERE, load_family
    from benchmarks.fidelity.families import FAMILIES

    spec = FAMILIES[family]
    assert os.path.getsize(os.path.join(HERE, spec.weights)) <= 5 * 1024 * 1024
    model = load_family(spec)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))  # the low-resolution path (interpolated positions)
    assert out.shape == (1, 4, 64, 64) and torch.isfinite(out).all()


def test_finetune_seeds_draw_disjoint_batches():
    """Seed 0 keeps the committed results' batches; seed k's batches overlap no other run's, nor the
    held-out or calibration seeds (evaluate --finetune-seeds)."""
    from benchmarks.fidelity import evaluate
    from benchmarks.fidelity.families import FAMILIES
    from benchmarks.fidelity.metrics import HELDOUT_SEED

    assert evaluate.finetune_data_seed(0) == evaluate.FINETUNE_SEED_BASE
    steps = max(f.finetune_steps for f in FAMILIES.values())
    blocks = [range(evaluate.finetune_data_seed(k), evaluate.finetune_data_seed(k) + steps) for k in range(10)]
    for a, b in zip(blocks, blocks[1:]):
        assert a[-1] < b[0]
    for seed in (HELDOUT_SEED, evaluate.CALIBRATION_SEED):
        assert all(seed not in r for r in blocks)


def test_segformer_per_head_groupings_on_reduced_keys_match_the_oracle():
    """Per-head groupings where queries and keys sit on two grids: the 2-head stage splits its heads
    (grid / window, each side on its own grid), the 1-head stage stays dense and says why."""
    model = small_segformer()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    grouping = ("grid", "window")
    gm, report = gridattn_fx.rewrite(model, (x,), gridattn_fx.GridAttnConfig(preset="segformer", stride=STRIDE,
                                                                             grouping=grouping))
    assert report.site(r"stages\.1\.blocks\.0\.attn").grouping == "grid|window", str(report)
    single = report.site(r"stages\.0\.blocks\.0\.attn")
    assert single.decision == "skipped" and "1 query heads do not split into 2 equal sets" in single.reason

    def oracle_forward(self, x, height, width):
        b, n, c = x.shape
        q = self.heads(self.query(x))
        kv = x.permute(0, 2, 1).reshape(b, c, height, width)
        kv = self.layer_norm(self.sr(kv).reshape(b, c, -1).permute(0, 2, 1))
        k, v = self.heads(self.key(kv)), self.heads(self.value(kv))
        reduced = (0, height // self.sr_ratio, width // self.sr_ratio)
        out = oracle_sdpa(q, k, v, q_layout=(0, height, width), k_layout=reduced, stride=STRIDE, grouping=grouping)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    with torch.no_grad():
        attn = model.get_submodule("stages.1.blocks.0.attn")
        attn.forward = types.MethodType(oracle_forward, attn)
        expected = model(x)
        assert_close64(gm(x), expected)


def test_quality_study_chooses_within_the_flops_of_stride_2(capsys):
    """The fidelity command's equal-FLOPs study on the committed segvit (few held-out images): the
    chosen configuration fits the FLOPs of uniform stride 2, every row says what it ran, and the
    ``quality:`` line has the fields the README quotes."""
    import re

    from benchmarks.fidelity.families import FAMILIES
    from benchmarks.fidelity.quality import quality_family

    result = quality_family(FAMILIES["segvit"], n=16)
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"grid2", "window2", "mixed2", "grid2+pool", "calibrated-grouping", "calibrated"}
    assert rows["grid2"]["flops_ratio"] == pytest.approx(0.25)
    assert rows["grid2+pool"]["flops_ratio"] > 0.25           # the pooled tokens cost FLOPs
    assert rows["calibrated"]["flops_ratio"] <= 0.25 + 1e-9
    assert "grid|window" in rows["mixed2"]["config"] and not rows["mixed2"]["left_dense_by_option"]
    line = result["line"]
    assert re.fullmatch(r"quality: family=segvit flops_ratio=0\.\d{3} equal_flops_drop=-?\d+\.\d\d% "
                        r"\(\+-\d+\.\d\d\) config=\S+", line), line
