"""Hypergradient solvers. Pure PyTorch (torch.func / autograd); no Ray, no I/O.

    >>> import metaray.solvers as S
    >>> S.names()                      # registry names
    >>> solver = S.make("maml", inner_steps=5, inner_lr=0.4)
    >>> hg = solver.hypergrad(problem, x, task)   # HyperGrad(grad, outer_loss, inner_loss, metrics, state)

Each solver family lives in its own module; importing this package registers them all.
"""
from .base import Solver, SolverOptions, get, make, names, option, register
from .core import (
    BilevelProblem,
    DivergedError,
    HyperGrad,
    NonFiniteError,
    Params,
    check_params,
    check_same_keys,
)
from . import unrolled, maml  # noqa: F401  (registers rad, trad, fad, darts, maml, fomaml, reptile, metasgd)
from .maml import metasgd_lrs
from . import implicit, closed_form  # noqa: F401  (registers imaml, ift-cg, ift-neumann, ridge)
from . import learned  # noqa: F401  (registers l2o: learned optimizers, lstm and mlp)
from . import bda, bvfim, sgld, fsla  # noqa: F401  (registers bda, bda-pessimistic, bvfim, sgld, fsla)
from .checkpoint import MemoryBudgetError, MemoryPlan

__all__ = [
    "BilevelProblem",
    "DivergedError",
    "HyperGrad",
    "MemoryBudgetError",
    "MemoryPlan",
    "NonFiniteError",
    "Params",
    "Solver",
    "SolverOptions",
    "check_params",
    "check_same_keys",
    "get",
    "make",
    "metasgd_lrs",
    "names",
    "option",
    "register",
]
