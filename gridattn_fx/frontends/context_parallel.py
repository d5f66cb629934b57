"""``gridattn_fx.context_parallel``: diffusers' context parallelism, made traceable in one graph.

diffusers' ``model.enable_parallelism(config=ContextParallelConfig(...))`` installs hooks that split
the token sequence into one contiguous chunk per rank and gather it back; attention runs through
Ulysses' all-to-all (or ring attention). The pass follows the chunk and the all-to-all as
layout-carrying ops (layout/collectives.py), so every site it rewrites in one process it rewrites
here too, provided Dynamo captures the forward as one graph. Two things in diffusers 0.42 prevent
that on a fresh model:

* the split hooks read the module's forward signature with ``inspect.signature`` on their first
  call, which Dynamo cannot trace: it skips the whole model forward (eager, for any backend), and
  the patch embedding that proves the layout never reaches a graph. This call reads the signatures
  once, eagerly, as the hooks would.
* ``enable_parallelism`` picks ``rank % torch.accelerator.device_count()``, which divides by zero
  on a machine without an accelerator (gloo on CPU): one device is stood in for that call only.

``group_stride=`` adds grid-group sharding: the tokens in group-major order around the engine's own
split and gather (:class:`_GroupOrder`), so that each rank holds whole grid groups and gridded sites
need no collective (passes/local_groups.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.nn as nn

from ..layout.collectives import group_major_axes


def context_parallel(model: nn.Module, config, *, cp_plan=None, group_stride=None) -> nn.Module:
    """``model.enable_parallelism(config=config, cp_plan=cp_plan)`` (diffusers), then readies its
    hooks for one-graph capture. Returns ``model``. Compile afterwards as usual:
    ``torch.compile(model, backend="gridattn", options={"stride": G, ...}, dynamic=False)``.

    ``group_stride``: grid-group sharding. The image tokens are put in the group-major order of this
    grid stride (an int, (Gh, Gw) or (Gt, Gh, Gw)) before the engine splits them and back after it
    gathers them (RoPE tables with them), so that each rank holds whole grid groups: every site the
    backend grids with this stride then runs on the rank's own groups with no collective
    (passes/local_groups.py); dense sites keep the engine's all-to-all. Ulysses only; the number of
    groups must be a multiple of the number of ranks and the heads of every attention too."""
    if not hasattr(model, "enable_parallelism"):
        raise TypeError(f"context_parallel() takes a diffusers model (ModelMixin); got {type(model).__name__}")
    plan = cp_plan if cp_plan is not None else getattr(model, "_cp_plan", None)
    order = _GroupOrder(model, config, group_stride, plan) if group_stride is not None else None
    if order is not None:
        order.install(inner=True)     # outputs the engine splits: permuted before its hook splits them
    with _stand_in_device_count():
        model.enable_parallelism(config=config, cp_plan=cp_plan)
    if order is not None:
        order.install(inner=False)    # inputs it splits and outputs it gathers: around its hooks
    primed = _prime_split_hooks(model)
    if primed == 0:
        raise RuntimeError("enable_parallelism installed no context-parallel split hook on this model: "
                           "nothing to ready (does its class define _cp_plan?)")
    return model


@contextlib.contextmanager
def _stand_in_device_count():
    if torch.accelerator.is_available():
        yield
        return
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real


def _prime_split_hooks(model: nn.Module) -> int:
    """Fill each split hook's parameter-index cache the way its first call would; returns how many."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    count = 0
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            if not isinstance(hook, ContextParallelSplitHook):
                continue
            metadata = hook.module_forward_metadata
            if metadata.cached_parameter_indices is None:
                metadata.cached_parameter_indices = _parameter_indices(metadata._cls)
            count += 1
    return count


def _parameter_indices(cls) -> dict[str, int]:
    """The positions of ``cls.forward``'s parameters (without self), as diffusers' hooks cache them."""
    names = list(inspect.signature(cls.forward).parameters)[1:]
    return {name: i for i, name in enumerate(names)}


class _GroupOrder:
    """The group-major token order of grid-group sharding, applied around the engine's own split
    and gather as views (reshape, permute, reshape), which the layout analysis follows from the
    patch embedding to each rank's chunk (layout/collectives.py)."""

    def __init__(self, model: nn.Module, config, group_stride, plan):
        from diffusers.models._modeling_parallel import ContextParallelConfig

        cp = getattr(config, "context_parallel_config", config)
        if not isinstance(cp, ContextParallelConfig):
            raise TypeError("group_stride needs a ContextParallelConfig (or a ParallelConfig holding one)")
        if (cp.ring_degree or 1) > 1:
            raise ValueError("grid-group sharding runs under Ulysses only (ulysses_degree); ring attention would "
                             "still pass every rank's keys around")
        if not plan:
            raise ValueError(f"{type(model).__name__} has no context-parallel plan (_cp_plan)")
        self.world = cp.ulysses_degree
        self.stride = (group_stride,) if isinstance(group_stride, int) else tuple(group_stride)
        if any(not isinstance(g, int) or g < 1 for g in self.stride):
            raise ValueError(f"group_stride must be positive integers, got {group_stride!r}")
        heads = getattr(getattr(model, "config", None), "num_attention_heads", None)
        if heads is not None and heads % self.world:
            raise ValueError(f"{heads} attention heads do not split over ulysses_degree={self.world}")
        self.model, self.plan, self.grid = model, plan, None
        self._check_groups(self.stride if len(self.stride) > 1 else None)

    def _check_groups(self, stride):
        if stride is None:
            return
        groups = 1
        for g in stride:
            groups *= g
        if groups % self.world:
            raise ValueError(f"grid-group sharding: {groups} grid groups of stride {tuple(stride)} do not split "
                             f"evenly over {self.world} ranks (the number of ranks must divide the number of groups)")

    def strides_for(self, rank: int) -> tuple:
        if len(self.stride) == rank:
            return self.stride
        if len(self.stride) == 1:
            return (1,) * (rank - 2) + self.stride * 2
        if len(self.stride) == 3 and rank == 2:
            return self.stride[1:]
        raise ValueError(f"group_stride {self.stride} does not fit a {rank}-D token grid")

    def install(self, inner: bool) -> None:
        from diffusers.hooks import HookRegistry
        from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

        for name, entry in self.plan.items():
            module = self.model.get_submodule(name) if name else self.model
            if isinstance(entry, dict):
                splits = {k: v for k, v in entry.items() if isinstance(v, ContextParallelInput)}
                outputs = {k: v for k, v in splits.items() if v.split_output}
                inputs = {k: v for k, v in splits.items() if not v.split_output}
                hook = _hooks()[1](self, outputs, output=True) if inner else _hooks()[1](self, inputs, output=False)
                wanted = outputs if inner else inputs
            else:
                gathers = [entry] if isinstance(entry, ContextParallelOutput) else list(entry)
                wanted = {i: g for i, g in enumerate(gathers) if g is not None}
                hook = None if inner else _hooks()[1](self, wanted, output=True, inverse=True)
            if hook is not None and wanted:
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, f"gridattn_order---{name}")
        if not inner:  # outermost: the grid is known before any reordering hook runs
            HookRegistry.check_if_exists_or_initialize(self.model).register_hook(_hooks()[0](self), "gridattn_grid")

    def permute(self, x, dim: int, inverse: bool = False):
        if self.grid is None:
            raise RuntimeError("grid-group sharding: the model's token grid is unknown (no call seen)")
        grid, stride = self.grid, self.strides_for(len(self.grid))
        if x.shape[dim] != math.prod(grid):
            raise ValueError(f"grid-group sharding: a tensor the engine splits has {x.shape[dim]} tokens along dim "
                             f"{dim}, not the {math.prod(grid)} image tokens of the {'x'.join(map(str, grid))} "
                             "grid (tokens besides the image's cannot be group-sharded)")
        if any(n % g for n, g in zip(grid, stride)):
            raise ValueError(f"grid-group sharding: stride {stride} does not divide the token grid {grid}")
        dim = dim % x.dim()
        lead, tail, k = x.shape[:dim], x.shape[dim + 1:], len(grid)
        split, order = group_major_axes(grid, stride)
        if inverse:  # from the permuted sizes back: the inverse permutation
            split, order = [split[a] for a in order], sorted(range(2 * k), key=order.__getitem__)
        y = x.reshape(*lead, *split, *tail)
        axes = [*range(dim), *(dim + a for a in order), *range(dim + 2 * k, y.dim())]
        return y.permute(*axes).reshape(x.shape)


def _token_grid(model: nn.Module, latents) -> tuple:
    """The post-patch token grid of a diffusers image/video transformer from its latent input."""
    config = getattr(model, "config", None)
    patch = getattr(config, "patch_size", None)
    patch_t = getattr(config, "patch_size_t", None)
    if patch is None or latents.dim() not in (4, 5):
        raise ValueError("grid-group sharding: cannot read the token grid from this model's input "
                         f"(hidden_states of shape {tuple(latents.shape)}, patch_size {patch})")
    spatial = latents.shape[-2:]
    if isinstance(patch, int):
        patch = ((patch_t or 1), patch, patch) if latents.dim() == 5 else (patch, patch)
    patch = tuple(patch)[-latents.dim() + 2:]
    sizes = (*latents.shape[2:-2], *spatial) if latents.dim() == 5 else tuple(spatial)
    return tuple(n // p for n, p in zip(sizes, patch))


@functools.cache
def _hooks():
    """The two hook classes, made on first use: the package imports diffusers lazily."""
    from diffusers.hooks import ModelHook
    from diffusers.hooks.context_parallel import ModuleForwardMetadata
    from diffusers.utils.torch_utils import unwrap_module

    class GridReader(ModelHook):
        """Records the call's token grid from the model's latent input, for the reordering hooks."""

        def __init__(self, order: _GroupOrder):
            super().__init__()
            self.order = order

        def pre_forward(self, module, *args, **kwargs):
            latents = kwargs.get("hidden_states", args[0] if args else None)
            order = self.order
            order.grid = _token_grid(module, latents)
            order._check_groups(order.strides_for(len(order.grid)))
            return args, kwargs

    class Reorder(ModelHook):
        """Puts the tensors the engine splits (or has gathered) into group-major order (or back)."""

        def __init__(self, order: _GroupOrder, entries: dict, output: bool, inverse: bool = False):
            super().__init__()
            self.order, self.entries, self.output, self.inverse = order, entries, output, inverse

        def initialize_hook(self, module):
            self.metadata = ModuleForwardMetadata(_cls=unwrap_module(module).__class__)
            self.metadata.cached_parameter_indices = _parameter_indices(self.metadata._cls)
            return module

        def _apply(self, x, entry):
            expected = getattr(entry, "expected_dims", None)
            if not isinstance(x, torch.Tensor) or (expected is not None and x.dim() != expected):
                return x  # the engine leaves it whole too
            dim = entry.split_dim if hasattr(entry, "split_dim") else entry.gather_dim
            return self.order.permute(x, dim, inverse=self.inverse)

        def pre_forward(self, module, *args, **kwargs):
            if self.output:
                return args, kwargs
            args = list(args)
            for name, entry in self.entries.items():
                value, is_kwarg, index = self.metadata._get_parameter_from_args_kwargs(name, args, kwargs)
                if value is None:
                    continue
                if is_kwarg:
                    kwargs[name] = self._apply(value, entry)
                else:
                    args[index] = self._apply(value, entry)
            return tuple(args), kwargs

        def post_forward(self, module, output):
            if not self.output:
                return output
            single = isinstance(output, torch.Tensor)
            items = [output] if single else list(output)
            for index, entry in self.entries.items():
                items[index] = self._apply(items[index], entry)
            return items[0] if single else type(output)(items)

    return GridReader, Reorder
