"""Peak memory of one computation (a task's hypergradient, a probe of one inner step), on CUDA and on the CPU.

    with PeakMemory(device) as meter:
        hg = solver.hypergrad(problem, x, task)
    meter.peak_bytes, meter.method

What is measured, by device:

- CUDA (``method = "cuda_max_memory_allocated"``): ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` at the start: every byte the caching allocator
  handed to tensors during the call, above what was allocated before it. Nested meters (a budget probe inside
  a measured hypergradient) do not lose the outer peak: an inner meter's reset first folds the peak so far
  into every enclosing meter.
- CPU (``method = "autograd_saved_bytes"``): PyTorch's CPU allocator keeps no statistics, and the profiler's
  allocation events cost about ten times the call (measured: a 5-step MAML hypergradient went from 10 ms to
  132 ms), so the CPU figure is the peak of the bytes **held for the backward pass**: the storage of every
  tensor an operation saves for its backward (``torch.autograd.graph.saved_tensors_hooks``; a storage saved
  several times counts once, from its first save until the last graph holding it is freed) plus the inner
  iterates a checkpointed unroll stores (``hold``). That is the part that grows with the horizon T in reverse
  mode and that checkpointing bounds. It leaves out temporaries no graph keeps (gradients in flight, a few
  Params-sized buffers) and counts inputs (x, task data) only where an operation saves them. On the MLP of
  benchmarks/memory_horizon.py it read 94-99% of the allocator's peak (torch.profiler events) for maml at
  T = 1..100. It costs one Python call per saved tensor (~7 µs): ~25% of a 3 ms task, under 10% of a 70 ms one.

The CPU hooks cannot run under ``torch.func.grad`` / ``vjp`` (torch refuses saved-tensor hooks there).
``measure`` then reruns the call untracked and reports no figure (None) rather than failing the task.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from .core import Params

T = TypeVar("T")

CUDA_METHOD = "cuda_max_memory_allocated"
CPU_METHOD = "autograd_saved_bytes"

_local = threading.local()  # per thread: the stack of active meters (hooks are thread-local too)


def _stack() -> list["PeakMemory"]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


class _Saved:
    """What autograd stores in place of a saved tensor while a CPU meter is active. When the graph that holds
    it is freed, this object is freed too, and the storage's count drops (one count per save)."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: Tensor, key: int, meter: "PeakMemory"):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter._release(self.key)


def _unpack(saved: Any) -> Tensor:
    return saved.tensor if isinstance(saved, _Saved) else saved


class PeakMemory:
    """Context manager: the peak bytes of one computation on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.method = CUDA_METHOD if self.device.type == "cuda" else CPU_METHOD
        self.peak_bytes = 0
        self._live = 0
        self._held: dict[int, list[int]] = {}  # storage address -> [saves, bytes]
        self._hooks: Any = None
        self._base = 0
        self._seen = 0  # CUDA: peak (absolute) folded in before an inner meter reset the counter

    # ---- CPU accounting ------------------------------------------------------------------------------

    def _add(self, t: Tensor) -> int | None:
        try:  # tensors without storage (sparse, some wrappers) are not counted rather than failing the call
            storage = t.untyped_storage()
            key = storage.data_ptr()
            entry = self._held.get(key)
            if entry is None:
                self._held[key] = [1, storage.nbytes()]
                self._live += self._held[key][1]
                if self._live > self.peak_bytes:
                    self.peak_bytes = self._live
            else:
                entry[0] += 1
            return key
        except Exception:  # noqa: BLE001 (measurement must never break the computation)
            return None

    def _release(self, key: int) -> None:
        entry = self._held.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._held[key]
            self._live -= entry[1]

    def _pack(self, t: Tensor) -> Any:
        key = self._add(t)
        # detach: autograd hands the pack hook a saved *output* with its own grad_fn; keeping that tensor would
        # close a cycle (output -> grad_fn -> saved variable -> output) that no garbage collector sees, and a
        # graph that is never back-propagated (a retained one) would then never be freed.
        return t if key is None else _Saved(t.detach(), key, self)

    def hold(self, t: Tensor) -> None:
        """Counts ``t`` as held until the tensor object ``t`` is freed (a checkpointed iterate)."""
        import weakref

        key = self._add(t)
        if key is not None:
            weakref.finalize(t, self._release, key)

    # ---- context manager -----------------------------------------------------------------------------

    def __enter__(self) -> "PeakMemory":
        stack = _stack()
        if self.method == CUDA_METHOD:
            torch.cuda.synchronize(self.device)
            peak_so_far = torch.cuda.max_memory_allocated(self.device)
            for outer in stack:
                if outer.method == CUDA_METHOD:
                    outer._seen = max(outer._seen, peak_so_far)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._hooks.__enter__()
        stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        stack = _stack()
        if stack and stack[-1] is self:
            stack.pop()
        if self.method == CUDA_METHOD:
            torch.cuda.synchronize(self.device)
            peak = max(self._seen, torch.cuda.max_memory_allocated(self.device))
            self.peak_bytes = max(0, peak - self._base)
        else:
            self._hooks.__exit__(*exc)


def hold(params: Params) -> Params:
    """Registers tensors a solver keeps for its backward pass outside autograd's graph (checkpointed iterates)
    with the innermost active CPU meter, so they count like saved tensors. Returns ``params`` unchanged."""
    stack = _stack()
    if stack and stack[-1].method == CPU_METHOD:
        for v in params.values():
            stack[-1].hold(v)
    return params


def _hooks_refused(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and "saved tensor hooks" in str(e)


def measure(fn: Callable[[], T], device: torch.device | str, *, track: bool = True) -> tuple[T, int | None, str]:
    """(fn(), peak bytes or None, method). With ``track=False``, or where the CPU hooks are refused
    (``torch.func.grad`` inside fn), fn runs untracked and the peak is None."""
    meter = PeakMemory(device)
    if not track:
        return fn(), None, meter.method
    try:
        with meter:
            out = fn()
    except RuntimeError as e:
        if not _hooks_refused(e):
            raise
        return fn(), None, meter.method
    return out, meter.peak_bytes, meter.method


def params_bytes(params: Params) -> int:
    """Bytes of the tensors of a Params dict."""
    return sum(v.numel() * v.element_size() for v in params.values())
