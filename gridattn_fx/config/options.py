"""User options: one validated config object, built from keyword options or ``torch.compile(options=...)``."""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, field, fields

from ..grid import Stride, normalize_stride
from .presets import preset_options
from .sites import check_grouping, check_shared_pool, entry_for, site_entries

IMPLEMENTATIONS = ("grouped", "masked")
DISTRIBUTINGS = ("straightforward", "shuffle")


@dataclass(frozen=True)
class GridAttnConfig:
    """What the pass may rewrite and how.

    stride            int, (Gh, Gw) or (Gt, Gh, Gw); 1 leaves every site alone. Normalised per site
                      to its layout's rank: on an image ``G`` is (G, G) and a triple applies its
                      (Gh, Gw) (with a warning, once per graph); on a video ``G`` is (1, G, G) and
                      a pair (Gh, Gw) is (1, Gh, Gw): temporal stride 1, groups span all frames.
    grouping          "grid" (the paper's Grid Clustering: token (t, r, c) joins group
                      (t mod Gt, r mod Gh, c mod Gw)) or "window" (contiguous tiles of
                      ceil(n / g) tokens per axis: the same number of groups, equal FLOPs), or a
                      tuple of those, one per equal contiguous set of heads: ("grid", "window")
                      groups the first half of every site's heads on the grid and the second half
                      in windows, at the same FLOPs (per-head groupings; rank-4 sites only).
                      Shuffle distributing is defined for grid grouping only: a window site
                      compiled in training mode with distributing="shuffle" stays dense (report).
    shared_pool       0 (the default) or p >= 2: every image query also attends to the key image
                      averaged over p x p windows of rows and columns (N / p^2 shared tokens, each
                      frame of a video pooled on its own), in the same softmax as its own group;
                      the report counts their FLOPs. Sites with a mask, a bias or dropout, and
                      key images that are no multiple of p, stay dense with the reason.
    min_image_tokens  sites whose query image has fewer tokens are skipped (grouping tiny images
                      costs more in regrouping than it saves). Whatever its value, a site whose
                      query or key image is smaller than the stride, or exactly its size (every
                      group would hold one image token), is skipped.
    include/exclude   regexes searched in each site's module path; a site must match some
                      ``include`` (when given) and no ``exclude``.
    implementation    "grouped" (regrouped attention, G times fewer FLOPs) or "masked" (dense
                      SDPA with the grid mask: the exact oracle, for checking).
    strict            raise when the pass fails instead of compiling the original graph.
    preset            a named bundle of the options above (gridattn_fx.config.presets.PRESETS); explicit
                      options override it. ``GridAttnConfig(preset=...)`` and
                      :meth:`from_preset` agree, except that the constructor cannot tell an option
                      left at its default from one set to the default value: there, every field
                      still equal to its default takes the preset's value. Unknown names raise
                      ValueError.
    distributing      "straightforward" (fixed groups) or "shuffle": a compiled module in training
                      mode draws a random group assignment on every call (docs/design.md section 1).
                      Inference is always straightforward.
    sites             {module path: SiteOptions(stride=..., grouping=...)} (or a dict of those
                      fields) for individual sites, overriding the global ``stride`` / ``grouping``.
                      A key names the site whose module path (as the report prints it) equals it,
                      or, failing that, ends with ``"." + key``: a model calibrated on its own
                      still matches inside a wrapper (``model.``, ``_orig_mod.`` prefixes); an
                      exact match wins, then the longest key (gridattn_fx/config/sites.py). Keys
                      that match no site of a graph are listed in its report and warned about.
    site_strides      {module path: stride}: an alias of ``sites`` setting only strides (what
                      :func:`calibrate` returns).
    site_groupings    {module path: grouping}: an alias of ``sites`` setting only groupings.
    move_regrouping   move Grid Clustering above the per-token ops that make q/k/v (projections,
                      norms) and Grid Recovering below those that consume the output, where that is
                      exact, so inductor folds both into neighbouring kernels (same result; False
                      keeps them around the attention call).
    """

    stride: Stride = (2, 2)
    min_image_tokens: int = 1024
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    implementation: str = "grouped"
    strict: bool = False
    preset: str | None = None
    distributing: str = "straightforward"
    site_strides: dict = field(default_factory=dict, hash=False)  # a dict: not part of the hash
    grouping: object = "grid"   # a name, or a tuple of names (per-head groupings)
    site_groupings: dict = field(default_factory=dict, hash=False)
    move_regrouping: bool = True
    shared_pool: int = 0
    sites: dict = field(default_factory=dict, hash=False)
    # Fields whose value the preset supplied (not the user): the report credits those decisions.
    # None (the constructor's default) means "apply the preset here" (see __post_init__).
    preset_fields: tuple[str, ...] | None = field(default=None, repr=False)
    _include_re: tuple = field(default=(), init=False, repr=False, compare=False)
    _exclude_re: tuple = field(default=(), init=False, repr=False, compare=False)
    # Every per-site setting of ``sites`` and its aliases, validated (config/sites.py).
    _site_entries: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.preset is not None and not isinstance(self.preset, str):
            raise TypeError(f"option 'preset' must be a preset name, got {self.preset!r}")
        preset_values = preset_options(self.preset) if self.preset is not None else {}  # checks the name
        if self.preset_fields is None:  # built directly, not by from_preset: the preset fills the defaults
            applied = tuple(name for name in preset_values if getattr(self, name) == _DEFAULTS[name])
            for name in applied:
                object.__setattr__(self, name, preset_values[name])
            object.__setattr__(self, "preset_fields", applied)
        try:
            stride = normalize_stride(self.stride)
        except TypeError as err:
            raise TypeError(f"option 'stride': {err}") from None
        if min(stride) < 1:
            raise ValueError(f"option 'stride' must be >= 1, got {self.stride!r}")
        object.__setattr__(self, "stride", stride)
        if not isinstance(self.min_image_tokens, int) or isinstance(self.min_image_tokens, bool):
            raise TypeError(f"option 'min_image_tokens' must be an int, got {self.min_image_tokens!r}")
        if self.min_image_tokens < 0:
            raise ValueError(f"option 'min_image_tokens' must be >= 0, got {self.min_image_tokens}")
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                isinstance(v, str) for v in value
            ):
                raise TypeError(f"option '{name}' must be a list of regex strings, got {value!r}")
            try:
                compiled = tuple(re.compile(v) for v in value)
            except re.error as err:
                raise ValueError(f"option '{name}': bad regex: {err}") from None
            object.__setattr__(self, name, tuple(value))
            object.__setattr__(self, f"_{name}_re", compiled)
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"option 'implementation' must be one of {IMPLEMENTATIONS}, got {self.implementation!r}"
            )
        for name in ("strict", "move_regrouping"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"option '{name}' must be a bool, got {getattr(self, name)!r}")
        if self.distributing not in DISTRIBUTINGS:
            raise ValueError(
                f"option 'distributing' must be one of {DISTRIBUTINGS}, got {self.distributing!r}"
            )
        object.__setattr__(self, "grouping", check_grouping(self.grouping, "option 'grouping'"))
        check_shared_pool(self.shared_pool, "option 'shared_pool'")
        entries, aliases = site_entries(self.sites, {"site_strides": self.site_strides,
                                                     "site_groupings": self.site_groupings})
        object.__setattr__(self, "sites", dict(self.sites))
        object.__setattr__(self, "site_strides", aliases["site_strides"])
        object.__setattr__(self, "site_groupings", aliases["site_groupings"])
        object.__setattr__(self, "_site_entries", entries)

    def site_value(self, name: str, module_path: str) -> tuple[object, str]:
        """A site's value of the per-site field ``name`` ("stride", "grouping") and where it came
        from, for the report: the per-site entry that names it, else the global option."""
        entry = entry_for(self._site_entries, name, module_path)
        if entry is None:
            return getattr(self, name), self.credit(name)
        where = f" ({entry.option})" if entry.key == module_path else f" ({entry.option} key {entry.key!r})"
        return entry.value, where

    def site_option(self, name: str, module_path: str) -> str:
        """The option that set a site's ``name`` field: "sites", an alias of it, or ``name`` itself."""
        entry = entry_for(self._site_entries, name, module_path)
        return name if entry is None else entry.option

    def stride_for(self, module_path: str) -> tuple[Stride, str]:
        """The stride a site gets and where it came from (for the report)."""
        return self.site_value("stride", module_path)

    def grouping_for(self, module_path: str) -> tuple[str, str]:
        """The grouping a site gets ("grid" / "window", or a tuple of them per head set) and where it
        came from (for the report)."""
        return self.site_value("grouping", module_path)

    def site_keys(self) -> list[tuple[str, str]]:
        """Every (option, key) that names sites, in the order given (for the unmatched-key check)."""
        return list(dict.fromkeys((e.option, e.key) for e in self._site_entries))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.init and f.name != "preset_fields")

    @classmethod
    def from_preset(cls, preset: str | None, **options) -> "GridAttnConfig":
        """The preset's options, then ``options`` on top (explicit options win)."""
        if preset is None:
            return cls(**options)
        values = preset_options(preset)
        from_preset = tuple(k for k in values if k not in options)
        values.update(options)
        return cls(**values, preset=preset, preset_fields=from_preset)

    def credit(self, field_name: str) -> str:
        """`` (preset 'x')`` when ``field_name``'s value came from the preset, else ""."""
        return f" (preset {self.preset!r})" if field_name in self.preset_fields else ""

    @classmethod
    def from_options(cls, options: dict | None) -> tuple["GridAttnConfig", dict]:
        """Split ``options`` into our config and the inductor options to pass through.

        Inductor options are checked against the types ``torch._inductor.config`` declares.
        ``"mode"`` expands to the inductor options of a torch.compile mode (torch.compile itself
        refuses ``mode=`` together with ``options=``); explicit inductor options override it.
        """
        ours, inductor = {}, {}
        known_inductor = _inductor_option_names()
        options = dict(options or {})
        mode = options.pop("mode", None)
        if mode is not None:
            inductor.update(_mode_options(mode))
        for key, value in options.items():
            if key in cls.option_names():
                ours[key] = value
            elif key in known_inductor:
                _check_inductor_option(key, value)
                inductor[key] = value
            else:
                raise ValueError(
                    f"unknown gridattn option {key!r}: expected one of {', '.join(cls.option_names())}, "
                    "'mode', or an inductor config option (torch._inductor.list_options())"
                )
        preset = ours.pop("preset", None)
        return cls.from_preset(preset, **ours), inductor

    def with_options(self, **options) -> "GridAttnConfig":
        from dataclasses import replace

        unknown = set(options) - set(self.option_names())
        if unknown:
            raise ValueError(f"unknown gridattn option(s): {', '.join(sorted(unknown))}")
        if "preset" in options:  # re-apply: the new preset under everything set explicitly
            explicit = {f: getattr(self, f) for f in self.option_names()
                        if f != "preset" and f not in self.preset_fields
                        and getattr(self, f) != _DEFAULTS[f]}
            explicit.update({k: v for k, v in options.items() if k != "preset"})
            return GridAttnConfig.from_preset(options["preset"], **explicit)
        return replace(self, **options, preset_fields=tuple(f for f in self.preset_fields if f not in options))

    def to_options(self) -> dict:
        """The options that rebuild this config (``torch.compile(..., options=...)``): those that
        differ from the defaults, with the preset's own values left to the preset."""
        out = {"preset": self.preset} if self.preset else {}
        for name in self.option_names():
            value = getattr(self, name)
            if name != "preset" and name not in self.preset_fields and value != _DEFAULTS[name]:
                out[name] = list(value) if name in ("include", "exclude") else value
        return out

    def left_out(self, module_path: str) -> str | None:
        """Why include/exclude leave a module path out (crediting a preset that set them), or None."""
        if self._include_re and not any(r.search(module_path) for r in self._include_re):
            return f"not matched by include={list(self.include)}" + self.credit("include")
        for r in self._exclude_re:
            if r.search(module_path):
                return f"matched by exclude {r.pattern!r}" + self.credit("exclude")
        return None


_DEFAULTS = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
             for f in fields(GridAttnConfig)}


def _inductor_option_names() -> set[str]:
    import torch._inductor

    return set(torch._inductor.list_options())


def _mode_options(mode) -> dict:
    """The inductor options of a torch.compile ``mode`` ("max-autotune", ...)."""
    from torch._inductor import list_mode_options

    if not isinstance(mode, str):
        raise TypeError(f"option 'mode' must be a torch.compile mode name (str), got {mode!r}")
    try:
        return dict(list_mode_options(mode))
    except RuntimeError as err:  # inductor's message lists the modes
        raise ValueError(f"option 'mode': {err}") from None


def _check_inductor_option(key: str, value) -> None:
    """Raise TypeError when ``value`` does not have the type torch._inductor.config declares for
    ``key`` (inductor would otherwise take it and fail, or misbehave, deep inside compilation)."""
    import torch._inductor.config as inductor_config

    declared = inductor_config.get_type(key)
    if declared is type(None):  # declared only by a None default: no type to check against
        return
    if not _has_type(value, declared):
        default = inductor_config.get_config_copy()[key]
        name = declared.__name__ if isinstance(declared, type) else str(declared).replace("typing.", "")
        raise TypeError(f"inductor option {key!r} must be {name} (its default is {default!r}), got {value!r}")


def _has_type(value, declared) -> bool:
    """isinstance for the annotations inductor's config uses (classes, X | None, Literal, list[X],
    tuple[...], dict[K, V], Callable); anything else is accepted unchecked."""
    import collections.abc
    import types
    import typing

    if declared is typing.Any:
        return True
    if declared is None or declared is type(None):
        return value is None
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin is None:
        if not isinstance(declared, type):
            return True  # a forward reference or a type variable
        if isinstance(value, bool) and declared is not bool:
            return declared is object  # True is an int to Python, not to a config option
        if declared is float:
            return isinstance(value, (int, float))
        return isinstance(value, declared)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin is collections.abc.Callable:
        return callable(value)
    if origin in (list, set, frozenset):
        return isinstance(value, origin) and all(_has_type(v, args[0]) for v in value) if args else isinstance(value, origin)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args)))
    if origin is dict:
        return isinstance(value, dict) and (not args or all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items()))
    return isinstance(value, origin) if isinstance(origin, type) else True
