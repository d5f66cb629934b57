"""``gridattn_fx.prepare``: layouts proven on the whole model, remembered for the graphs that cannot
prove them (regional compilation, graph breaks), and layouts declared at the model's edge.

A graph that starts at tokens - a block compiled on its own (``block.compile(backend="gridattn")``,
diffusers' ``compile_repeated_blocks``), the piece after a graph break - has no spatial source, so
the layout analysis (layout/analysis.py) cannot prove what its tokens are. prepare():

1. captures the whole model with non-strict ``torch.export`` (which runs the Python code, graph
   breaks included), with a ``gridattn::probe`` marker on every tensor input of every submodule and
   a ``gridattn::layout_hint`` on every declared input;
2. runs the layout analysis on that graph and keeps, for every module that holds an attention site
   (and every module around one), the layouts of its tensor inputs;
3. installs forward pre-hooks: on the model, one that finds the layouts for the call's input sizes
   (capturing again at sizes it has not seen: the layouts of a call are always those a whole-model
   proof at that call's sizes gives); on each of those modules, one that - only while Dynamo traces
   it - wraps its inputs in ``gridattn::layout_hint`` (gridattn_fx/crossgraph/markers.py). Dynamo reads the
   layout from Python state, so it guards on it: a call at other sizes recompiles the region with its
   own layout instead of reusing another's. Eager calls are untouched.

The ``gridattn`` pass reads the markers as layout sources and removes them (crossgraph/hints.py);
any other backend sees a free alias. ``unprepare(model)`` removes the hooks and the state.
"""

from __future__ import annotations

import inspect
import logging
import math
import types
import warnings
import weakref
from collections import OrderedDict

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from ..ir.module_paths import module_path
from ..layout.analysis import LayoutAnalysis
from ..layout.facts import LayoutSource, Tokens
from ..patterns import find_attention_sites
from .declarations import ImageTokens
from .hints import strip_layout_hints
from .markers import PROBE, MarkerHint, is_layout_hint, is_probe

logger = logging.getLogger("gridattn_fx")

_ATTR = "_gridattn_prepared"
_PREPARED_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_CACHE_LIMIT = 64  # layouts kept per model: one entry per distinct input-size signature


def prepare(model: nn.Module, example_inputs, **declarations: ImageTokens) -> nn.Module:
    """Prove the token layouts of ``model`` once on the whole model and remember them on it, so
    that compiling the model or any part of it with ``backend="gridattn"`` rewrites the sites a
    whole-model compile at the call's resolution would. Returns ``model`` (hooks added, nothing
    else changed); calling it again replaces the earlier preparation; :func:`unprepare` undoes it.

    ``example_inputs``: a tuple of positional inputs (``model(*example_inputs)``) or a dict of
    keyword inputs (``model(**example_inputs)``); the model runs on them (under fake tensors).
    ``declarations``: ``input_name=ImageTokens(...)`` for inputs that hold image tokens the model
    cannot prove (tokens packed outside the model, e.g. Flux's ``hidden_states``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare() takes an nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TypeError("prepare(): example_inputs must be a tuple of positional inputs or a dict of keyword "
                        f"inputs, got {type(example_inputs).__name__}")
    signature = inspect.signature(model.forward)
    for name, declaration in declarations.items():
        if name not in signature.parameters or signature.parameters[name].kind in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ValueError(f"prepare(): declared input '{name}' is not an input of "
                             f"{type(model).__name__}.forward{signature}")
        if not isinstance(declaration, ImageTokens):
            raise TypeError(f"prepare(): declaration for input '{name}' must be a gridattn_fx.ImageTokens, "
                            f"got {type(declaration).__name__}")
    unprepare(model)
    state = _Prepared(model, signature, declarations)
    try:
        state.current = state.layouts_for(args, kwargs, first=True)
    except ValueError:
        raise
    except Exception as err:
        raise RuntimeError(f"prepare(): capturing {type(model).__name__} on the example inputs failed "
                           f"({type(err).__name__}: {err})") from err
    state.install()
    setattr(model, _ATTR, state)
    _PREPARED_MODELS.add(model)
    return model


def unprepare(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare`: remove its hooks and remembered layouts (a no-op on other models).
    Graphs already compiled with the markers keep them; recompile (torch._dynamo.reset())."""
    state = model.__dict__.pop(_ATTR, None)
    if state is not None:
        state.remove()
    _PREPARED_MODELS.discard(model)
    return model


def prepared_models() -> list[nn.Module]:
    """The live models :func:`prepare` has been called on (and not undone)."""
    return list(_PREPARED_MODELS)


def prepared_layouts(model: nn.Module) -> dict | None:
    """The layouts remembered for the model's last call (or the example inputs): {module path:
    [(input, layout text)]}; None when the model is not prepared."""
    state = model.__dict__.get(_ATTR)
    if state is None:
        return None
    return {path: [(key, str(hint)) for key, hint in entries] for path, entries in (state.current or {}).items()}


# --- the state kept on a prepared model -------------------------------------------------------

class _Prepared:
    def __init__(self, model: nn.Module, signature: inspect.Signature, declarations: dict):
        self.model_name = type(model).__name__
        self._model_ref = model  # a cycle through the model's own attribute: collected with it
        self.signature = signature
        self.declarations = dict(declarations)
        self.by_signature: OrderedDict = OrderedDict()
        self.current: dict | None = None
        self.capturing = False
        self.handles: list = []
        self.wrapped: dict[str, nn.Module] = {}
        self.published = None
        self.warned: set[str] = set()

    # -- hooks ------------------------------------------------------------------------------------
    def install(self) -> None:
        self.handles.append(self._model_ref.register_forward_pre_hook(_root_hook(self), with_kwargs=True))
        self._wrap_modules(self.current)
        self.publish(self.current)

    def _wrap_modules(self, table) -> None:
        modules = dict(self._model_ref.named_modules())
        for path in (table or {}):
            if path and path not in self.wrapped and path in modules:
                _wrap_forward(modules[path])
                self.wrapped[path] = modules[path]

    def publish(self, table) -> None:
        """Give every wrapped module the layouts of its inputs for this call (read while traced)."""
        if table is self.published:
            return
        for path, module in self.wrapped.items():
            module.__dict__[_MARKS] = (table or {}).get(path, ())
        self.published = table

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.wrapped.values():
            _unwrap_forward(module)
        self.wrapped.clear()

    # -- layouts per call -------------------------------------------------------------------------
    def layouts_for(self, args, kwargs, first=False) -> dict:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        declared = {}
        for name, declaration in self.declarations.items():
            declared[name] = _check_declared(name, declaration, arguments)
        key = (_shapes(args, kwargs), tuple(sorted(declared.items())))
        table = self.by_signature.get(key)
        if table is None:
            try:
                table = _remembered_layouts(self, args, kwargs, declared)
            except Exception as err:
                if first:
                    raise
                message = (f"gridattn prepare(): capturing {self.model_name} at new input sizes failed "
                           f"({type(err).__name__}: {err}); its regions get no remembered layouts at these sizes")
                if message not in self.warned:
                    self.warned.add(message)
                    warnings.warn(message, RuntimeWarning, stacklevel=4)
                table = {}
            self.by_signature[key] = table
            while len(self.by_signature) > _CACHE_LIMIT:
                self.by_signature.popitem(last=False)
            if self.handles:
                self._wrap_modules(table)
        return table


def _check_declared(name: str, declaration: ImageTokens, arguments: dict) -> tuple:
    value = arguments.get(name)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"declared input '{name}' must be a tensor, got {type(value).__name__}")
    prefix, *image_shape, suffix = declaration.resolve(name, arguments)
    dim = declaration.dim % value.dim() if -value.dim() <= declaration.dim < value.dim() else None
    if dim is None:
        raise ValueError(f"declared input '{name}': dim={declaration.dim} is out of range for shape {tuple(value.shape)}")
    length = prefix + math.prod(image_shape) + suffix
    if value.shape[dim] != length:
        kind = "video" if len(image_shape) == 3 else "image"
        raise ValueError(f"declared input '{name}': {prefix} prefix + {'x'.join(map(str, image_shape))} {kind} + "
                         f"{suffix} suffix = {length} tokens, but axis {dim} of its shape {tuple(value.shape)} holds "
                         f"{value.shape[dim]}")
    return (dim, prefix, tuple(image_shape), suffix, declaration.transposed)


def _shapes(args, kwargs) -> tuple:
    """What a call's layouts can depend on: tensor shapes, and ints/bools (a forward may take its
    grid as ints, e.g. SegFormer's ``H, W``). Floats and tensor values are left out."""
    leaves, _ = pytree.tree_flatten((args, kwargs))
    return tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else x if isinstance(x, (int, bool)) else None
                 for x in leaves)


@torch.compiler.disable
def _resolve_call(state: _Prepared, args, kwargs) -> None:
    # Eager always (a graph break when the model itself is compiled): declarations read input values.
    state.current = state.layouts_for(args, kwargs)
    state.publish(state.current)


def _root_hook(state: _Prepared):
    def gridattn_prepare_root(module, args, kwargs):
        # An export (gridattn_fx.rewrite, torch.export) sees the whole model in one graph: it needs
        # no remembered layouts, and could not take the graph break of the lookup.
        if not state.capturing and not torch.compiler.is_exporting():
            _resolve_call(state, args, kwargs)
        return None
    return gridattn_prepare_root


# A module that holds an attention site gets an instance attribute ``forward`` (a method shared by
# all such modules, so one compiled region still serves every block with the same layouts) that
# marks its inputs and calls the original forward. It has to be inside ``forward``: Dynamo traces
# forward pre-hooks as frames of their own, and a marker returned from one would reach the
# region's graph as a plain input. The layouts are read from the module's ``_MARKS`` attribute,
# which Dynamo guards by value: a call with other layouts recompiles the region.
_MARKS = "_gridattn_marks"
_ORIGINAL = "_gridattn_original_forward"


_INSTANCE = "_gridattn_instance_forward"


def _wrap_forward(module: nn.Module) -> None:
    # An instance ``forward`` set by someone else is called (and restored) as it is; otherwise the
    # class's forward function is called with the module (a plain function Dynamo inlines).
    instance = module.__dict__.get("forward")
    module.__dict__[_INSTANCE] = instance
    module.__dict__[_ORIGINAL] = instance if instance is not None else type(module).forward
    module.__dict__[_MARKS] = ()
    module.forward = types.MethodType(_marked_forward_for(type(module)), module)


_MARKED_FORWARDS: dict[type, types.FunctionType] = {}


def _marked_forward_for(cls: type) -> types.FunctionType:
    """One copy of :func:`_marked_forward` per module class: Dynamo counts recompiles per code
    object, so each class keeps its own budget, as its own ``forward`` would have."""
    fn = _MARKED_FORWARDS.get(cls)
    if fn is None:
        code = _marked_forward.__code__
        code = code.replace(co_name=f"{code.co_name}_{cls.__name__}",
                            co_qualname=f"{code.co_qualname}_{cls.__name__}")
        fn = types.FunctionType(code, _marked_forward.__globals__, code.co_name)
        _MARKED_FORWARDS[cls] = fn
    return fn


def _unwrap_forward(module: nn.Module) -> None:
    instance = module.__dict__.pop(_INSTANCE, None)
    module.__dict__.pop(_ORIGINAL, None)
    module.__dict__.pop(_MARKS, None)
    if instance is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = instance


def _marked_forward(self, *args, **kwargs):
    if self.__dict__[_INSTANCE] is None:
        args = (self,) + args
    forward = self.__dict__[_ORIGINAL]
    # Only graphs need the markers; an eager call stays exactly as it was.
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return forward(*args, **kwargs)
    offset = 0 if self.__dict__[_INSTANCE] is not None else 1
    marks = self.__dict__[_MARKS]
    if marks:
        args, kwargs = list(args), dict(kwargs)
        for key, hint in marks:
            positional = isinstance(key, int)
            key = key + offset if positional else key
            if positional and key >= len(args) or not positional and key not in kwargs:
                continue
            x = args[key] if positional else kwargs[key]
            if not isinstance(x, torch.Tensor) or x.dim() != hint.ndim:
                continue
            # Comparing the sizes also makes Dynamo specialize them: the marked graph is static.
            if any(x.shape[d] != n for d, n in zip(hint.dims, hint.lengths)):
                continue
            marked = hint.mark(x)
            if positional:
                args[key] = marked
            else:
                kwargs[key] = marked
    return forward(*args, **kwargs)


# --- the whole-model proof ----------------------------------------------------------------------

def _remembered_layouts(state: _Prepared, args, kwargs, declared: dict) -> dict:
    """Capture the model at these inputs and read the layouts at the inputs of every module that
    holds (or is) an attention site: {module path: ((input position or name, hint), ...)}."""
    model = state._model_ref
    probes: list[tuple[str, object]] = []
    handles = []

    def probe_hook(path):
        def hook(module, a, kw):
            a = list(a)
            for i, x in enumerate(a):
                if isinstance(x, torch.Tensor):
                    probes.append((path, i))
                    a[i] = PROBE(x, len(probes) - 1)
            for name, x in kw.items():
                if isinstance(x, torch.Tensor):
                    probes.append((path, name))
                    kw[name] = PROBE(x, len(probes) - 1)
            return tuple(a), kw
        return hook

    def declare_hook(module, a, kw):
        bound = state.signature.bind(*a, **kw)
        for name, (dim, prefix, image_shape, suffix, transposed) in declared.items():
            x = bound.arguments[name]
            bound.arguments[name] = MarkerHint.tokens(x.dim(), dim, prefix, image_shape, suffix, transposed,
                                                      declared=True).mark(x)
        return tuple(bound.args), dict(bound.kwargs)

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(probe_hook(path), with_kwargs=True))
    if declared:
        handles.append(model.register_forward_pre_hook(declare_hook, with_kwargs=True, prepend=True))
    state.capturing = True
    published = state.published
    state.publish({})  # no markers from an earlier call inside this capture
    try:
        with torch.no_grad():
            program = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    finally:
        state.capturing = False
        state.publish(published)
        for handle in handles:
            handle.remove()
    gm = program.graph_module
    probed = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and is_probe(node.target):
            source = node.args[0]
            while source.op == "call_function" and is_layout_hint(source.target):
                source = source.args[0]  # a declared input probed as it is: the marker goes, its fact is its input's
            probed.setdefault(node.args[1], source)
    hints, conflicts = strip_layout_hints(gm)
    sites = find_attention_sites(gm)
    analysis = LayoutAnalysis(gm, {s.output: (s.query, s.query_dim) for s in sites if s.build is not None},
                              None, hints, conflicts)
    if declared:
        _check_declarations_against_graph(gm, analysis)
    site_paths = {module_path(s.output) for s in sites}
    holders = {p for path in site_paths for p in _enclosing(path)}
    table: dict[str, dict] = {}
    for index, source in probed.items():
        path, key = probes[index]
        if path not in holders:
            continue
        hint = _marker_hint(analysis.facts.get(source), source)
        entries = table.setdefault(path, {})
        if key in entries and entries[key] != hint:
            hint = None  # the module is called with different layouts: no single one to remember
        entries[key] = hint
    out = {path: tuple((k, h) for k, h in entries.items() if h is not None) for path, entries in table.items()}
    out = {path: entries for path, entries in out.items() if entries}
    logger.debug("gridattn prepare(): %s remembered layouts at %d module inputs", state.model_name,
                 sum(len(e) for e in out.values()))
    return out


def _check_declarations_against_graph(gm, analysis) -> None:
    """A declared token layout that meets a layout the graph proves for the same tokens (same
    axis and length, another grid) is a contradiction: ValueError naming the declared input."""
    for node in gm.graph.nodes:
        if node in analysis.facts:
            continue
        facts = [analysis.facts.get(a) for a in node.all_input_nodes]
        declared = [f for f in facts if isinstance(f, Tokens) and f.source is LayoutSource.DECLARED]
        proven = [f for f in facts if isinstance(f, Tokens) and f.source is LayoutSource.PROVEN]
        for d in declared:
            for p in proven:
                same_tokens = d.dim == p.dim and d.prefix + d.image_tokens + d.suffix == p.prefix + p.image_tokens + p.suffix
                if same_tokens and (d.prefix, d.image_shape, d.suffix, d.order) != (
                        p.prefix, p.image_shape, p.suffix, p.order):
                    raise ValueError(
                        f"declared input '{d.marked or '?'}': its layout {_tokens_text(d)} contradicts "
                        f"the {_tokens_text(p)} the graph proves from {p.origin} "
                        f"(they meet at `{node.name}`)")


def _tokens_text(fact) -> str:
    return f"{fact.prefix}+{'x'.join(str(n) for n in fact.image_shape)}+{fact.suffix}"


def _enclosing(path: str):
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a`` (not the root: its inputs are the model's own)."""
    parts = path.split(".") if path else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _marker_hint(fact, node: fx.Node) -> MarkerHint | None:
    """A fact as a marker states it, only with concrete sizes."""
    value = node.meta.get("val")
    if fact is None or not isinstance(value, torch.Tensor):
        return None
    return MarkerHint.of_fact(fact, value.dim())
