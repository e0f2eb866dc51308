"""Mixed precision for the inner loop: ``[run] precision = "bf16"``.

The inner loss f(x, y) is what an inner loop evaluates T times (and differentiates twice for second-order
methods), so that is where reduced precision pays. ``AutocastInner`` wraps a problem so that

- f's forward runs under ``torch.autocast(device, bfloat16)``: matrix products and convolutions in bf16, the ops
  autocast keeps in fp32 (losses, softmax, norms) in fp32;
- f comes back as an fp32 scalar, and every gradient autograd returns for the fp32 params x, y is fp32 (the
  casts are differentiable), so the inner updates y − α∇f and the hypergradient accumulate in fp32;
- the outer loss F, the params and the reduction stay fp32;
- the implicit solvers (ift-cg, ift-neumann, imaml) take y_T from the bf16 inner steps but build their linear
  system ∇²_yy f q = ∇_y F and the mixed term in fp32 (``full_precision``): CG on bf16 Hessian-vector products
  loses conjugacy within a few steps (measured: 0.9 relative error on the sinusoid MLP, against ~1e-3 with
  the system in fp32).

Precision against fp32 is measured in ``benchmarks/precision.py`` and documented in docs/benchmarks.md. bf16 needs
float32 params (autocast leaves float64 alone, so a float64 run would silently stay float64) and a device with
bf16 autocast; both are refused up front with the reason.
"""
from __future__ import annotations

from typing import Any

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, dtype: str, device: torch.device | str | None = None) -> None:
    """Raises ValueError when ``precision`` is unknown or cannot run with this dtype / device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return
    if dtype != "float32":
        raise ValueError(f"precision='bf16' autocasts float32 params to bfloat16 and needs dtype='float32', got dtype={dtype!r} "
                         "(autocast does not touch float64 tensors, so the run would silently stay float64)")
    if device is None:
        return
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):
        raise ValueError(f"precision='bf16': torch has no autocast for device type {kind!r}; use precision='fp32'")
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision='bf16': this GPU does not support bfloat16; use precision='fp32'")


class AutocastInner:
    """``problem`` with its inner loss under bf16 autocast (see the module docstring); every other attribute is
    the wrapped problem's, so the batching protocol, metrics and projections pass through unchanged."""

    def __init__(self, problem: Any, device_type: str):
        self.problem, self.device_type = problem, device_type

    def __getattr__(self, name: str) -> Any:
        if name in ("problem", "device_type"):  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.problem, name)

    def inner_loss(self, x: Any, y: Any, task: Any) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            loss = self.problem.inner_loss(x, y, task)
        return loss.float() if isinstance(loss, torch.Tensor) else loss

    @property
    def full_precision(self) -> Any:
        """The wrapped fp32 problem (``solvers.core.full_precision``: the implicit solvers' linear system)."""
        return self.problem

    def batched(self) -> "AutocastInner":
        """The wrapped problem's vmap-safe twin (``solvers.batched``), still autocast."""
        twin = self.problem.batched() if callable(getattr(self.problem, "batched", None)) else self.problem
        return AutocastInner(twin, self.device_type)

    def __repr__(self) -> str:
        return f"AutocastInner({self.problem!r}, bf16 on {self.device_type})"


def with_precision(problem: Any, precision: str, device: torch.device | str) -> Any:
    """The problem an inner learner computes with: itself for fp32, ``AutocastInner`` for bf16."""
    return problem if precision == "fp32" else AutocastInner(problem, torch.device(device).type)
