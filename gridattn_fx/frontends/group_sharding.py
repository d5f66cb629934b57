"""``gridattn_fx.GroupSharding``: grid-group sharding under torch's own context parallelism.

torch's context parallelism (``torch.distributed.tensor.experimental``) shards the model's token
inputs outside the model, each rank keeping one contiguous chunk, after an optional reordering by a
load balancer; inside the model every ``F.scaled_dot_product_attention`` becomes attention over the
whole sequence through DTensor (q, k, v wrapped by ``DTensor.from_local(..., [Shard(2)])``: ring
attention on CUDA, an all-gather of k and v elsewhere).

Here the load balancer puts the tokens in the group-major order of a grid stride, so each rank's
chunk is whole grid groups, and the shard is recorded for the pass by tensor identity (as a graph
break hands facts over: crossgraph/break_handoff.py, checked at every call). The layout analysis
follows ``from_local`` / ``to_local`` (layout/analysis.py), and a site gridded with that stride runs
on the rank's own q, k, v with no collective (passes/local_groups.py); dense sites keep torch's.
The graph cannot prove what a model input holds, so the sizes given here are trusted the way a
declared layout is (``prepare(..., x=ImageTokens(...))``); the shard's length is checked.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ..crossgraph.break_handoff import record_tensor
from ..layout.collectives import group_major, group_major_axes
from ..layout.facts import Tokens

ORIGIN = "a grid-group shard (gridattn_fx.GroupSharding)"


class GroupSharding:
    """Grid-group sharding of a ``grid`` of image tokens ((H, W) or (T, H, W), row-major, no other
    tokens) over a 1-D device ``mesh``, by grid ``stride``::

        sharding = gridattn_fx.GroupSharding(mesh, grid=(T, H, W), stride=(1, 2, 2))
        compiled = torch.compile(model, backend="gridattn", options={"stride": (1, 2, 2)}, dynamic=False)
        x_local = sharding.shard(tokens, dim=1)     # torch's own shard, group-major load balancer
        with sharding.attention():                  # torch's context-parallel SDPA (dense sites)
            y_local = compiled(x_local)
        y = sharding.unshard(y_local, dim=1)

    The number of ranks must divide the number of groups (the product of the stride)."""

    def __init__(self, mesh, grid, stride):
        if mesh.ndim != 1:
            raise ValueError(f"GroupSharding takes a 1-D device mesh (the context-parallel dimension), got {mesh.ndim}-D")
        self.mesh = mesh
        self.world = mesh.size()
        self.grid, self.stride = tuple(grid), tuple(stride)
        if len(self.grid) not in (2, 3) or len(self.stride) != len(self.grid):
            raise ValueError(f"grid and stride must both be (H, W) or (T, H, W); got grid={grid!r}, stride={stride!r}")
        if any(not isinstance(n, int) or n < 1 for n in (*self.grid, *self.stride)):
            raise ValueError(f"grid and stride must be positive integers; got grid={grid!r}, stride={stride!r}")
        if any(n % g for n, g in zip(self.grid, self.stride)):
            raise ValueError(f"grid-group sharding: stride {self.stride} does not divide the token grid {self.grid}")
        groups = math.prod(self.stride)
        if groups % self.world:
            raise ValueError(f"grid-group sharding: {groups} grid groups of stride {self.stride} do not split "
                             f"evenly over {self.world} ranks (the number of ranks must divide the number of groups)")
        self.tokens = math.prod(self.grid)

    def order(self, restore: bool = False) -> torch.Tensor:
        """Token indices of group-major order (``x[..., order, ...]`` reorders); ``restore``: the inverse."""
        split, axes = group_major_axes(self.grid, self.stride)
        forward = torch.arange(self.tokens).reshape(split).permute(axes).reshape(-1)
        return torch.argsort(forward) if restore else forward

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's chunk of ``x`` (its ``dim`` holds the grid's tokens), cut by torch's
        ``_context_parallel_shard`` after the group-major load balancer; recorded for the pass."""
        from torch.distributed.tensor.experimental._attention import _context_parallel_shard

        dim = dim % x.dim()
        if x.shape[dim] != self.tokens:
            raise ValueError(f"grid-group sharding: the tensor has {x.shape[dim]} tokens along dim {dim}, not the "
                             f"{self.tokens} image tokens of the {'x'.join(map(str, self.grid))} grid (tokens "
                             "besides the image's cannot be group-sharded)")
        if dim == 0:
            raise ValueError("grid-group sharding: the tokens cannot be on dim 0 (torch's unshard reads dim 0 as the batch)")
        (local,) = _context_parallel_shard(self.mesh, [x], [dim], load_balancer=_balancer(self))
        record_tensor(local, self.fact(dim))
        return local

    def unshard(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence in the model's order from every rank's chunk (torch's unshard)."""
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard

        (whole,) = context_parallel_unshard(self.mesh, [y], [dim % y.dim()], load_balancer=_balancer(self))
        return whole

    def fact(self, dim: int) -> Tokens:
        """What this rank's chunk holds, as the layout analysis states it."""
        k = len(self.grid)
        return Tokens(dim, 0, self.grid, 0, tuple(range(k)), origin=ORIGIN,
                      image=(("group-sharded input", self.grid, self.stride),), batch=(0,),
                      shard=(self.mesh.get_local_rank(), self.world), groups=group_major(self.grid, self.stride))

    @contextlib.contextmanager
    def attention(self):
        """torch's context-parallel SDPA for the sites that stay dense: ``F.scaled_dot_product_attention``
        through DTensor over the mesh (torch's input wrapping and attention dispatch), with two
        corrections:

        * the result is redistributed to the query's placement (the tokens, ``Shard(2)``) before
          ``to_local()``. torch's output hook unwraps whatever placement sharding propagation chose:
          with the math kernel at 8192 tokens on 4 ranks it is the heads (``Shard(1)``), whose local
          tensor has the query chunk's size and other contents, so the model went on silently wrong;
        * on a CPU mesh the math SDPA kernel is selected around the DTensor call only: Dynamo's trace
          of DTensor's CPU flash-attention kernel did not finish in 10 minutes here (torch 2.13). The
          local attention of gridded sites keeps the default kernel."""
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.experimental._context_parallel import _attention as cp
        from torch.nn.attention import SDPBackend, sdpa_kernel

        original = F.scaled_dot_product_attention
        wrapping = cp._ContextParallel(seq_dim=2, attention_type=cp._ContextParallel.AttentionType.SDPA)

        def on_query_placement(module, inputs, outputs, mesh):
            if isinstance(outputs, DTensor):
                outputs = outputs.redistribute(mesh, [Shard(2)])
            return wrapping.sdpa_output_fn(module, inputs, outputs, mesh)

        previous = cp._dispatch_mode
        cp._dispatch_mode = cp._DispatchMode.MONKEY_PATCH
        cp._distribute_function(original, F, self.mesh, wrapping.sdpa_input_fn, on_query_placement)
        cp._enable_cp_dtensor_dispatcher()
        distributed = F.scaled_dot_product_attention
        if self.mesh.device_type == "cpu":
            def math_kernel_for_dtensors(*args, **kwargs):
                with sdpa_kernel(SDPBackend.MATH):
                    return distributed(*args, **kwargs)

            F.scaled_dot_product_attention = math_kernel_for_dtensors
        try:
            yield
        finally:
            F.scaled_dot_product_attention = distributed
            cp._restore_function(distributed, F)
            cp._disable_cp_dtensor_dispatcher()
            cp._dispatch_mode = previous


def _balancer(sharding: GroupSharding):
    """torch's load-balancer hook returning the group-major order (a class built on first use:
    torch.distributed is imported only by users of this frontend)."""
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _LoadBalancer

    class GroupMajorBalancer(_LoadBalancer):
        def _generate_indices(self, restore: bool = False) -> torch.Tensor:
            return sharding.order(restore).to(sharding.mesh.device_type).unsqueeze(0)

    return GroupMajorBalancer()
