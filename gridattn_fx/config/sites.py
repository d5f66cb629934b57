"""Per-site options: ``sites={path pattern: SiteOptions(stride=..., grouping=...)}``.

One map names individual sites and overrides the config's global value of each field it sets. The
older one-field maps (``site_strides={path: stride}``, ``site_groupings={path: grouping}``) are
accepted aliases: each is read into the same map, and the report still credits the option the user
wrote. A new per-site option is one field of :class:`SiteOptions` and one line of :data:`FIELDS`.

A key names the site whose module path (as the report prints it) equals it, or, failing that,
ends with ``"." + key`` (a model calibrated on its own still matches inside a wrapper: ``model.``,
``_orig_mod.`` prefixes); an exact match wins, then the longest key. A field is looked up among the
keys that set it, so two keys may set different fields of one site.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

from ..grid import GROUPINGS, normalize_stride


@dataclass(frozen=True)
class SiteOptions:
    """Options for the sites a ``sites`` key names; None leaves the config's global value."""

    stride: object = None      # int, (Gh, Gw) or (Gt, Gh, Gw), as the config's ``stride``
    grouping: object = None    # "grid" / "window" or a tuple of them per head set, as the config's ``grouping``
    shared_pool: int | None = None   # as the config's ``shared_pool``


def _stride(value, where: str):
    try:
        stride = normalize_stride(value)
    except TypeError as err:
        raise TypeError(f"{where}: {err}") from None
    if min(stride) < 1:
        raise ValueError(f"{where} must be >= 1, got {stride}")
    return stride


def check_grouping(value, where: str):
    """A grouping name, or a tuple of names, one per equal contiguous set of heads (per-head
    groupings: ``("grid", "window")`` puts the first half of the heads on the grid and the second
    half in windows). A list is read as a tuple; one name per set repeated is that grouping."""
    if isinstance(value, (tuple, list)) and not isinstance(value, str):
        if not value:
            raise ValueError(f"{where}: per-head groupings must name at least one grouping")
        names = tuple(check_grouping(v, f"{where}[{i}]") for i, v in enumerate(value))
        return names[0] if len(set(names)) == 1 else names
    if not isinstance(value, str):
        raise TypeError(f"{where} must be a grouping name (one of {tuple(GROUPINGS)}) or a tuple of them "
                        f"(one per head set), got {value!r}")
    if value not in GROUPINGS:
        raise ValueError(f"{where} must be one of {tuple(GROUPINGS)}, got {value!r}")
    return value


def check_shared_pool(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{where} must be an int (a pooling window, 0 for none), got {value!r}")
    if value < 0 or value == 1:
        raise ValueError(f"{where} must be 0 (none) or a pooling window >= 2, got {value}")
    return value


@dataclass(frozen=True)
class SiteField:
    alias: str                          # the one-field config option that also sets it ("": none)
    check: Callable[[object, str], object]   # validates and normalises a value; `where` names it


FIELDS: dict[str, SiteField] = {
    "stride": SiteField("site_strides", _stride),
    "grouping": SiteField("site_groupings", check_grouping),
    "shared_pool": SiteField("", check_shared_pool),
}
assert set(FIELDS) == {f.name for f in fields(SiteOptions)}


@dataclass(frozen=True)
class SiteEntry:
    key: str
    field: str
    value: object
    option: str     # the config option that set it: "sites" or an alias


def _paths(mapping, option: str, what: str) -> dict:
    if not isinstance(mapping, dict):
        raise TypeError(f"option '{option}' must be a dict {{module path: {what}}}, got {mapping!r}")
    for path in mapping:
        if not isinstance(path, str):
            raise TypeError(f"option '{option}': keys must be module paths (str), got {path!r}")
    return mapping


def site_entries(sites, aliases: dict[str, dict]) -> tuple[tuple[SiteEntry, ...], dict[str, dict]]:
    """Validate ``sites`` and the alias maps ({alias option: mapping}); returns every (key, field)
    setting, and each alias map with its values normalised. Raises naming the option and key."""
    entries: dict[tuple[str, str], SiteEntry] = {}
    for key, options in _paths(sites, "sites", "SiteOptions(...)").items():
        if isinstance(options, dict):
            unknown = set(options) - set(FIELDS)
            if unknown:
                raise ValueError(f"option 'sites'[{key!r}]: unknown field(s) {', '.join(sorted(unknown))}; "
                                 f"expected {', '.join(FIELDS)}")
            options = SiteOptions(**options)
        if not isinstance(options, SiteOptions):
            raise TypeError(f"option 'sites'[{key!r}] must be SiteOptions(...) or a dict of its fields, "
                            f"got {options!r}")
        for name, spec in FIELDS.items():
            value = getattr(options, name)
            if value is not None:
                where = f"option 'sites'[{key!r}].{name}"
                entries[key, name] = SiteEntry(key, name, spec.check(value, where), "sites")
    normalised = {}
    for name, spec in FIELDS.items():
        if not spec.alias:
            continue
        mapping = _paths(aliases.get(spec.alias, {}), spec.alias, name)
        normalised[spec.alias] = {}
        for key, value in mapping.items():
            value = spec.check(value, f"option '{spec.alias}'[{key!r}]")
            normalised[spec.alias][key] = value
            earlier = entries.get((key, name))
            if earlier is not None and earlier.value != value:
                raise ValueError(f"option '{spec.alias}'[{key!r}] = {value!r} contradicts "
                                 f"'sites'[{key!r}].{name} = {earlier.value!r}")
            entries.setdefault((key, name), SiteEntry(key, name, value, spec.alias))
    return tuple(entries.values()), normalised


def names_site(key: str, module_path: str) -> bool:
    """Whether a per-site key names the site at ``module_path``: the exact path, or a suffix after
    a dot (a wrapper adds a prefix to the paths calibrate() saw)."""
    return module_path == key or module_path.endswith("." + key)


def entry_for(entries, field: str, module_path: str) -> SiteEntry | None:
    """The entry that sets ``field`` for the site at ``module_path``: the exact path's, else the
    longest key the path ends with; None when no key sets it there."""
    hits = [e for e in entries if e.field == field and names_site(e.key, module_path)]
    exact = [e for e in hits if e.key == module_path]
    if exact:
        return exact[0]
    return max(hits, key=lambda e: len(e.key)) if hits else None
