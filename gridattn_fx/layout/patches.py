"""Patches and pooled windows of tokens: a model input cut into patches (a view, or ``F.unfold``)
is a spatial source, and a sequence pooled in windows that stay within rows is a reduced image.
Methods of :class:`LayoutAnalysis` (layout/analysis.py) kept here.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from ..ir.op_catalogue import arg, resolve
from ..ir.values import shape_of as _shape
from ..ir.values import value_of as _val
from .facts import Spatial, Tokens, _static, _step
from .reshape import _reshape


class Patches:
    def _patchified_input(self, node, name, inp, out):
        """A patchify written as a view of a model input (AuraFlow, Lumina, CogView: ``x.view(B, C,
        H / p, p, W / p, p)``, no convolution): an NCHW (NCTHW) input is an image (video) exactly
        when its rows and columns are cut into patches; the input's own H and W (T) are then the
        spatial source. Any other reshape of an input proves nothing (a 4-D input may be a mask or
        a (B, heads, L, D) tensor), so the input carries no fact of its own."""
        value = _val(inp) if isinstance(inp, fx.Node) and inp.op == "placeholder" else None
        if (not isinstance(value, torch.Tensor) or value.dim() not in (4, 5) or not value.is_floating_point()
                or inp in self.inherited or inp in self.hints):
            return None
        sizes = tuple(value.shape[2:])
        origin = f"model input `{inp.name}` ({'x'.join(str(s) for s in sizes)}, patchified)"
        image = Spatial(tuple(range(2, value.dim())), sizes, origin=origin, image=(("root", inp.name, id(self.gm)),),
                        batch=(0,))
        patches = _reshape(image, tuple(value.shape), tuple(out.shape), name)
        if patches is None or not patches.trail or not patches.trail[-1].endswith("(patchify)"):
            return None
        if any(_static(out.shape[d]) == _static(n) for d, n in zip(patches.axes[-2:], sizes[-2:])):
            return None  # rows or columns left whole: not cut into patches (frames may stay whole)
        return patches

    # One transfer function per kind of the op catalogue (ir/op_catalogue.py); ``fact`` is the
    # first operand's (None only for the kinds in _FROM_SEVERAL_INPUTS), ``out`` the output value.
    def _im2col(self, node, name, fact, out):
        """``F.unfold(x, k, stride=k)`` of an (N, C, H, W) image: its (H / k) x (W / k) patches, in
        raster order on axis 2 (a reduction of the image, as a strided conv); of a model input, the
        patchify that makes the input an image (both axes cut, as :meth:`_patchified_input`)."""
        functional = node.op == "call_function" and (node.target is torch.nn.functional.unfold or (
            isinstance(node.target, torch._ops.OpOverload) and name == "im2col"))
        inp = node.args[0]
        value = _val(inp) if isinstance(inp, fx.Node) else None
        if not functional or not isinstance(value, torch.Tensor) or value.dim() != 4:
            return None

        def pair(v, default):
            v = resolve(v if v is not None else default)
            return tuple(v) if isinstance(v, (list, tuple)) else (v, v)
        kernel = pair(arg(node, 1, "kernel_size"), None)
        dilation, padding = pair(arg(node, 2, "dilation", 1), 1), pair(arg(node, 3, "padding", 0), 0)
        stride = pair(arg(node, 4, "stride", 1), 1)
        if not (all(isinstance(k, int) and k >= 1 for k in kernel) and stride == kernel
                and dilation == (1, 1) and padding == (0, 0)):
            return None
        h, w = value.shape[2], value.shape[3]
        if not all(isinstance(n, int) for n in (h, w)):
            return None
        patches = (h // kernel[0], w // kernel[1])
        if fact is None:
            if inp.op != "placeholder" or not value.is_floating_point() or min(kernel) < 2 or (
                    inp in self.inherited or inp in self.hints):
                return None
            origin = f"model input `{inp.name}` ({h}x{w}, patchified by unfold)"
            return _step(Tokens(2, 0, patches, 0, (0, 1), origin=origin, image=(("root", inp.name, id(self.gm)),),
                                batch=(0,)), name)
        if not isinstance(fact, Spatial) or fact.axes != (2, 3) or not set(fact.batch) <= {0}:
            return None
        return _step(Tokens(2, 0, patches, 0, (0, 1), origin=fact.origin, trail=fact.trail, image=fact.image,
                            batch=fact.batch, source=fact.source, marked=fact.marked), name)

    def _pool1d(self, node, name, fact, out):
        """Pooling of the token axis in windows of k consecutive tokens (kernel == stride, no
        padding): when the image's innermost stored axis is a multiple of k, every window lies in
        one row, and the result is the same image reduced k times along that axis (a reduction of
        the image, like a strided conv's keys)."""
        kernel = resolve(arg(node, 1, "kernel_size"))
        stride = resolve(arg(node, 2, "stride", None))
        kernel = kernel[0] if isinstance(kernel, (list, tuple)) and len(kernel) == 1 else kernel
        stride = stride[0] if isinstance(stride, (list, tuple)) and len(stride) == 1 else stride
        stride = kernel if stride in (None, ()) or stride == [] else stride
        padding = resolve(arg(node, 3, "padding", 0))
        dilation = resolve(arg(node, 4, "dilation", 1)) if name == "max_pool1d" else 1
        ceil = resolve(arg(node, 5 if name == "max_pool1d" else 4, "ceil_mode", False))
        plain = (isinstance(kernel, int) and kernel == stride and padding in (0, (0,), [0])
                 and dilation in (1, (1,), [1]) and ceil is False)
        ndim = len(_shape(node.args[0]))
        if not (plain and isinstance(fact, Tokens) and fact.dim == ndim - 1 and not fact.lead
                and fact.prefix == 0 and fact.suffix == 0 and set(fact.batch) <= {0}):
            return None
        inner = fact.order[-1]
        size = fact.image_shape[inner]
        if not isinstance(size, int) or size % kernel:
            self._why[node] = (f"windows of {kernel} consecutive tokens that straddle the rows of "
                               f"{size} tokens: the pooled tokens are no image")
            return None
        shape = list(fact.image_shape)
        shape[inner] = size // kernel
        return _step(replace(fact, image_shape=tuple(shape)), name)
