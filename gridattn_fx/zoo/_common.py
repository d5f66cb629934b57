"""Helpers shared by the zoo builders: seeding, dtype, re-drawing zero-initialised parameters."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch


def require(module_name: str, what: str, *, import_it: bool = True):
    """Import ``module_name`` (a top-level package) or raise ``ModuleNotFoundError`` naming the zoo
    entry that needs it. ``import_it=False`` only checks that it is installed."""
    if importlib.util.find_spec(module_name) is None:
        raise ModuleNotFoundError(
            f"{what} needs `{module_name}`, which is not installed: run scripts/install_zoo.sh "
            "(see docs/zoo.md)", name=module_name)
    return importlib.import_module(module_name) if import_it else None


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's CPU RNG seeded, leaving the caller's RNG state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def redraw_zero_init(model: torch.nn.Module, std: float = 0.02) -> int:
    """Re-draw every floating-point parameter that is exactly zero everywhere from N(0, std).

    Libraries zero-initialise some tensors on purpose for training (SAM's relative-position
    tables, DiT/PixArt adaLN-Zero modulation, zero-init output projections, biases). With random
    weights that would make some attention sites not affect the output at all, and an equality
    test between two rewrites of such a site would prove nothing. Returns how many were redrawn.
    """
    n = 0
    for p in model.parameters():
        if p.is_floating_point() and p.numel() and not bool(p.any()):
            p.normal_(0.0, std)
            n += 1
    return n


def finish(model: torch.nn.Module, inputs: tuple, *, dtype: torch.dtype, nonzero_init: bool):
    """Eval mode, optional zero-init redraw, cast the model and the floating-point inputs to dtype."""
    if nonzero_init:
        redraw_zero_init(model)
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype=dtype)
    model = model.eval()
    inputs = tuple(_cast(x, dtype) for x in inputs)
    return model, inputs


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def images(batch_size: int, size, channels: int = 3) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch_size, channels, h, w)
