"""Import-time stand-in for ``torchvision``, used only by the zoo loader to import timm and
segment_anything on a CPU-only PyTorch.

Why: timm and segment_anything import torchvision at module import time (timm for its data
transforms and ``FrozenBatchNorm2d``, segment_anything for ``batched_nms`` / ``resize`` in its
predictor utilities), but none of the *model classes* the zoo builds calls torchvision. PyPI's only
torchvision wheel for torch 2.13 (0.28.0) is a CUDA build: its ``_C.so`` links ``libtorch_cuda.so``,
which the CPU torch lacks, so ``import torchvision`` fails with ``RuntimeError: operator
torchvision::nms does not exist``. CPU torchvision wheels live only on the PyTorch download site,
which is not reachable here, and installing torchvision through pip would pull or replace torch.

What: :func:`torchvision_for_import` is a context manager. If a real torchvision imports, it is
used and nothing is stubbed. Otherwise it puts a small set of stub modules into ``sys.modules``
for the duration of the ``with`` block only (the import of timm / segment_anything), and removes
them afterwards, so that nothing else in the process (transformers' availability checks,
inductor's ``has_torchvision_roi_align``) ever sees a fake torchvision. The modules that imported
it keep their references to the stub objects.

The stub provides exactly the submodules these libraries import. Every name in them is a
placeholder class: importing it, subclassing it or using it as a dict key works, but calling or
instantiating it raises ``RuntimeError`` saying that the real torchvision is needed. Only
``InterpolationMode`` is a real enum (timm builds lookup tables from it at import time). The
``ops`` modules expose only the names listed (no ``roi_align`` etc.), so capability probes fail
the normal way.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import logging
import sys
import types

log = logging.getLogger("gridattn_fx")

STUB_VERSION = "0.0.0+gridattn_fx.stub"

# Submodules that are created, and for the ``ops`` ones the only names they expose.
_STRICT_NAMES = {
    "torchvision.ops": ("misc", "boxes", "FrozenBatchNorm2d", "batched_nms", "box_area", "nms"),
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "torchvision.ops.boxes": ("batched_nms", "box_area", "nms"),
}
# Modules whose any attribute is a placeholder (transforms classes and functions, datasets).
_OPEN_MODULES = (
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.transforms.v2",
    "torchvision.transforms.v2.functional",
    "torchvision.datasets",
    "torchvision.io",
    "torchvision.utils",
)

_state = {"mode": None}  # "real" or "stub" once decided


class InterpolationMode(enum.Enum):
    """Same members and values as ``torchvision.transforms.InterpolationMode``."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _unavailable(qualname: str):
    def fail(*args, **kwargs):
        raise RuntimeError(
            f"{qualname} is a gridattn_fx zoo stub: the real torchvision is not importable with this "
            "torch build (see docs/zoo.md). The zoo only builds models; data pipelines need torchvision.")
    return fail


class _PlaceholderMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(cls.__module__, f"{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        _unavailable(f"{cls.__module__}.{cls.__qualname__}")()


def _placeholder(module: str, qualname: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {
        "__module__": module, "__qualname__": qualname, "__gridattn_stub__": True,
        "__init__": _unavailable(f"{module}.{qualname}"),
    })


def _open_getattr(module_name: str):
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = _placeholder(module_name, name)
        setattr(sys.modules.get(module_name) or _built[module_name], name, value)
        return value
    return __getattr__


_built: dict[str, types.ModuleType] = {}


def _build() -> dict[str, types.ModuleType]:
    if _built:
        return _built
    names = ["torchvision", *_STRICT_NAMES, *_OPEN_MODULES]
    for name in names:
        mod = types.ModuleType(name, "gridattn_fx zoo stub for torchvision (see gridattn_fx/zoo/_torchvision_stub.py)")
        mod.__gridattn_stub__ = True
        mod.__path__ = []  # a package, so submodule imports resolve through sys.modules
        _built[name] = mod
    _built["torchvision"].__version__ = STUB_VERSION
    for name in _OPEN_MODULES:
        _built[name].__getattr__ = _open_getattr(name)
    for name in ("torchvision.transforms", "torchvision.transforms.functional", "torchvision.transforms.v2"):
        _built[name].InterpolationMode = InterpolationMode
    for name, attrs in _STRICT_NAMES.items():
        for attr in attrs:
            if f"{name}.{attr}" not in _built:
                setattr(_built[name], attr, _placeholder(name, attr))
    # Parent packages expose their submodules as attributes.
    for name, mod in _built.items():
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(_built[parent], child, mod)
    return _built


def _purge_torchvision() -> dict[str, types.ModuleType]:
    removed = {}
    for key in list(sys.modules):
        if key == "torchvision" or key.startswith("torchvision."):
            removed[key] = sys.modules.pop(key)
    return removed


def real_torchvision_available() -> bool:
    """Whether a real torchvision imports in this process (decided once, then cached)."""
    if _state["mode"] is None:
        existing = sys.modules.get("torchvision")
        if existing is not None and not getattr(existing, "__gridattn_stub__", False):
            _state["mode"] = "real"
        elif importlib.util.find_spec("torchvision") is None:
            _state["mode"] = "stub"
        else:
            try:
                importlib.import_module("torchvision")
                _state["mode"] = "real"
            except Exception as exc:  # the CUDA wheel on CPU torch raises RuntimeError, others ImportError
                _purge_torchvision()
                log.info("torchvision is installed but does not import (%s: %s); the zoo uses its stub",
                         type(exc).__name__, exc)
                _state["mode"] = "stub"
    return _state["mode"] == "real"


@contextlib.contextmanager
def torchvision_for_import():
    """Make ``import torchvision`` work inside the block: the real one if it imports, else the stub.

    Yields ``"real"`` or ``"stub"``. The stub modules are removed from ``sys.modules`` on exit.
    """
    if real_torchvision_available():
        yield "real"
        return
    saved = _purge_torchvision()
    stub = _build()
    sys.modules.update(stub)
    try:
        yield "stub"
    finally:
        for key in list(sys.modules):
            if (key == "torchvision" or key.startswith("torchvision.")) and sys.modules[key] is stub.get(key):
                del sys.modules[key]
        sys.modules.update(saved)


def import_with_torchvision(module_name: str):
    """``importlib.import_module(module_name)`` with :func:`torchvision_for_import` around it."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    with torchvision_for_import():
        return importlib.import_module(module_name)
