"""Where and in what precision a measurement runs (``--device`` / ``--dtype`` of ``demo`` and of
``python -m benchmarks``), and what depends on it: timing (CUDA events on a GPU), peak memory, and
the SDPA kernels each call ran.

Models and inputs are built on the CPU in float32 and placed here; integer and boolean inputs
(timesteps, class labels, masks) keep their dtype.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The aten op each SDPA implementation dispatches to, as the profiler names it -> what tables print.
SDPA_KERNELS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "cpu-flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_flash_attention_forward": "flash",
    "aten::_efficient_attention_forward": "efficient",
}


@dataclass(frozen=True)
class Target:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    @staticmethod
    def parse(device: str, dtype: str) -> "Target":
        """A target from the command line's spelling; ValueError naming the option otherwise."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {device!r}")
        if dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to this process "
                             f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
        return Target(device, DTYPES[dtype])

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        """What tables say produced them."""
        if self.cuda:
            return f"cuda ({torch.cuda.get_device_name()}), {self.dtype_name}"
        return f"cpu, {self.dtype_name}"

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module on the device in the dtype (left as it is when its first parameter already is:
        diffusers warns at every cast, even a no-op one)."""
        first = next(iter(module.parameters()), None)
        if first is not None and first.device.type == self.device and first.dtype == self.dtype:
            return module
        return module.to(device=self.device, dtype=self.dtype)

    def place_inputs(self, value: Any) -> Any:
        """Tensors moved to the device, floating ones cast to the dtype, through tuples, lists and dicts."""
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                return value.to(device=self.device, dtype=self.dtype)
            return value.to(self.device)
        if isinstance(value, (tuple, list)):
            return type(value)(self.place_inputs(v) for v in value)
        if isinstance(value, dict):
            return {k: self.place_inputs(v) for k, v in value.items()}
        return value

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], Any]) -> float:
        """One call's latency: CUDA events around it on a GPU (the kernels' time, launch included),
        the wall clock on the CPU."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def peak_bytes(self, fn: Callable[[], Any]) -> int:
        """Peak bytes allocated during one call beyond what was allocated before it."""
        if self.cuda:
            self.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.no_grad():
                out = fn()
            self.synchronize()
            del out
            return torch.cuda.max_memory_allocated() - base
        return peak_allocated_bytes(fn)


def peak_allocated_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes allocated (and not yet freed) during one call, from the profiler's
    allocation events: the forward's working memory on top of what existed before (inputs,
    weights). Works for eager and compiled code alike (both allocate through c10)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = sorted((e.start_time_ns, e.typed[1].alloc_size) for e in walk(tree)
                    if e.typed[0] == _EventType.Allocation)
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


def sdpa_kernels(fn: Callable[[], Any]) -> str:
    """The SDPA implementations one call ran ("flash", "efficient", "math", ...), each with its
    number of calls, from the profiler's op names: compiled code calls the same aten ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        kind = SDPA_KERNELS.get(event.name)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return " ".join(f"{kind}x{n}" for kind, n in sorted(counts.items()))
