"""What a hand-written attention site is replaced by (patterns/manual.py reads the site): the
original's own feature-wise ops on its own tensors, then the plan's attention in the SDPA
convention of docs/design.md section 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .relpos_bias import call_plan_relpos


@dataclass(frozen=True)
class ManualReplacement:
    """The replacement of a hand-written site for a plan: the original's own feature-wise ops on
    its own tensors (normalize, transposes, tensor scales, v's cast), then the plan's attention
    with the site's biases and keep-masks summed into one additive mask (or its rel-pos terms)."""

    q_norm: tuple | None
    k_norm: tuple | None
    channels_first: bool
    k_transposed: bool
    divides: tuple          # per tensor scale: divide (True) or multiply
    n_bias: int
    n_keep: int
    multipliers: tuple      # per bias: its constant factor
    negations: tuple        # per keep-mask: True where the mask marks what to drop
    relpos: bool
    score_dtype: torch.dtype
    v_cast: bool
    out_dtype: torch.dtype

    def __call__(self, plan, implementation):
        attend = getattr(plan, implementation)
        n_factors = len(self.divides)

        def replacement(q, k, v, *extra):
            if self.q_norm is not None:
                q = F.normalize(q, *self.q_norm)
            if self.k_norm is not None:
                k = F.normalize(k, *self.k_norm)
            if self.channels_first:
                q, v = q.transpose(-2, -1), v.transpose(-2, -1)
            if self.k_transposed:
                k = k.transpose(-2, -1)
            if n_factors:  # scale * t * (q @ k^T) == scale * (t * q) @ k^T: t is constant along tokens
                extra, given = extra[:len(extra) - n_factors], extra[len(extra) - n_factors:]
                for factor, divide in zip(given, self.divides):
                    q = q / factor if divide else q * factor
            if self.v_cast:
                out = same_dtype(q, k, v.to(self.score_dtype), *extra).to(self.out_dtype)
            else:
                out = same_dtype(q, k, v, *extra)
            # v @ P^T gave a contiguous (..., dv, N) tensor, and its readers may view it as such
            return out.transpose(-2, -1).contiguous() if self.channels_first else out

        def same_dtype(q, k, v, *extra):
            if self.relpos:
                return call_plan_relpos(plan, implementation)(q, k, v, *extra)
            mask = None
            for node, mult in zip(extra[:self.n_bias], self.multipliers):
                term = node if mult == 1.0 else node * mult
                mask = term if mask is None else mask + term
            for node, negate in zip(extra[self.n_bias:self.n_bias + self.n_keep], self.negations):
                term = torch.where(node, float("-inf"), 0.0) if negate else torch.where(node, 0.0, float("-inf"))
                term = term.to(q.dtype)
                mask = term if mask is None else mask + term
            return attend(q, k, v, mask)

        return replacement
