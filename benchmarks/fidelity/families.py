"""The model families of the fidelity benchmark: how each is built, trained, stored and compiled.

``segvit`` is the original plain ViT (global attention over 32 x 32 tokens in every block, nothing
else mixing neighbouring tokens after the stem). ``sam`` and ``segformer`` have the structure of
two of the paper's families (SAM's image encoder; SegFormer) at the paper's operating point,
64 x 64 image tokens at 128 pixels. Each family keeps its own weights and training log next to this
file; ``python -m benchmarks.fidelity.train --family NAME`` writes them and
``python -m benchmarks.fidelity.evaluate`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .model import SegViT
from .sam_like import SamLike
from .segformer_like import SegFormerLike

__all__ = ["FAMILIES", "Family"]


@dataclass(frozen=True)
class Family:
    name: str
    build: type[nn.Module]
    weights: str                       # file name next to this module
    train_log: str
    kwargs_key: str                    # where train_log keeps the constructor arguments
    description: str
    # training recipe (train.py): a cheap phase at 64 px, then a phase at 128 px
    lowres_steps: int
    lowres_batch: int
    steps: int
    batch: int
    lr: float = 2e-3
    pre_phase: tuple[int, int, int] = (0, 0, 0)   # (steps, px, batch) before the 64 px phase
    model_config: dict = field(default_factory=dict)
    # backend options every grid configuration of this family starts from (the paper's preset)
    options: dict = field(default_factory=dict)
    # how grid configurations run: "compile" = torch.compile(backend="gridattn") (inductor), or
    # "rewrite" = gridattn_fx.rewrite() (the same pass; the rewritten graph runs eagerly). Inductor
    # took 3-4 minutes per configuration to compile the SegFormer-like model on the shared 2-core
    # machine, more than the whole evaluation may take, so the new families use "rewrite".
    engine: str = "rewrite"
    # evaluation (evaluate.py): held-out images and fine-tuning budget. The SAM-like model's global
    # attention over 4096 tokens in SAM's explicit matmul-softmax form makes it the slowest to run
    # (~1.9 s per training step of 2 images on 2 idle cores), so it gets fewer images and steps: all
    # three families together must evaluate in under 10 minutes
    heldout_n: int = 96
    finetune_steps: int = 150
    finetune_batch: int = 8
    calibration_samples: int = 16
    # the equal-FLOPs quality study (quality.py): held-out images enough for a 95% interval of the
    # drop below one point (segvit's is 1.2 points on 96 images)
    quality_n: int = 96


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "segvit", SegViT, "segvit.pt", "train_log.json", "segvit_kwargs",
            "plain ViT, 4 global blocks over 32x32 tokens (conv stem, patch 4)",
            lowres_steps=1500, lowres_batch=16, steps=600, batch=8, model_config={"stem": "conv4bn"},
            engine="compile", quality_n=768,
        ),
        Family(
            "sam", SamLike, "samlike.pt", "train_log_samlike.json", "model_kwargs",
            "SAM-like: 6 blocks (windowed 8x8 except global blocks 2 and 5 over 64x64 tokens), decomposed rel-pos",
            pre_phase=(1500, 32, 16), lowres_steps=2500, lowres_batch=8, steps=300, batch=2, model_config={"num_heads": 2},
            options={"preset": "sam"}, heldout_n=48, finetune_steps=30, finetune_batch=2, calibration_samples=16,
            quality_n=96,
        ),
        Family(
            "segformer", SegFormerLike, "segformerlike.pt", "train_log_segformerlike.json", "model_kwargs",
            "SegFormer-like: 3 stages (64x64, 32x32, 16x16 tokens; keys 8x8 via sr conv), Mix-FFN, MLP decoder",
            lowres_steps=800, lowres_batch=16, steps=300, batch=8,
            options={"preset": "segformer"}, heldout_n=96, finetune_steps=100, finetune_batch=4, calibration_samples=16,
            quality_n=192,
        ),
    )
}
