"""Bad-input fuzzing of solver options and of the params given to solvers (hypothesis).

Every case must end in a valid solver / a correct result, or in ValueError / TypeError / NonFiniteError whose
message names what is wrong; never another exception from deep inside torch, never silently wrong numbers.
The default selection runs a few hundred cases; the ``slow`` versions run thousands (counts are printed:
``pytest -m slow -s``).
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import metaray.solvers as S
from metaray.solvers import NonFiniteError
from metaray.tasks import ModelProblem, QuadraticProblem, SinusoidSource, mlp, quadratic_task

from faultkit import count  # noqa: E402  (fuzz case counter; conftest prints it per module)


FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SOLVERS = S.names()
OPTIONS = {n: [f.name for f in dataclasses.fields(S.get(n).Options)] for n in SOLVERS}
# Known gaps, pinned by strict xfail tests (and excluded from the fuzz so it keeps finding new ones); none left:
KNOWN_BAD_OPTIONS: set[tuple[str, str]] = set()
FUZZ_OPTIONS = {n: [o for o in opts if (n, o) not in KNOWN_BAD_OPTIONS] for n, opts in OPTIONS.items()}

any_value = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.lists(st.floats(-10, 10), max_size=4),
    st.tuples(st.integers(-3, 3), st.text(max_size=3)),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just(torch.tensor(0.1)),
)


@st.composite
def option_case(draw):
    name = draw(st.sampled_from(SOLVERS))
    opts = {}
    for opt in draw(st.lists(st.sampled_from(FUZZ_OPTIONS[name]), min_size=1, max_size=3, unique=True)):
        opts[opt] = draw(any_value)
    if draw(st.integers(0, 9)) == 0:  # an unknown option name now and then
        opts[draw(st.text(min_size=1, max_size=10))] = draw(any_value)
    return name, opts


def check_options_case(name: str, opts: dict) -> None:
    count("solver options")
    try:
        solver = S.make(name, **opts)
    except (ValueError, TypeError) as e:
        msg = str(e)
        bad = [k for k in opts if k not in OPTIONS[name]]
        if bad:
            assert "unknown option" in msg and repr(bad[0]) in msg, msg
        else:  # the message names one of the options given (a cross-field rule names both)
            assert any(repr(k) in msg or f"{k} " in msg or f"{k}=" in msg or f"{k})" in msg for k in opts), (name, opts, msg)
        return
    # accepted: every option holds the value given (ints widened to float where the option is a float)
    for k, v in opts.items():
        got = getattr(solver.options, k)
        assert got == v or (isinstance(v, list) and tuple(v) == tuple(got)), (k, v, got)
        assert not (isinstance(got, float) and not math.isfinite(got)), f"non-finite {k}={got!r} accepted by {name}"


@FAST
@given(option_case())
def test_fuzz_solver_options(case):
    check_options_case(*case)


@pytest.mark.slow
@SLOW
@given(option_case())
def test_fuzz_solver_options_slow(case):
    check_options_case(*case)


@pytest.mark.parametrize("value", [1, torch.tensor(0.1)], ids=["int", "tensor"])
def test_l2o_betas_error_names_the_option(value):
    with pytest.raises((ValueError, TypeError), match="betas"):
        S.make("l2o", betas=value)


def test_unknown_solver_and_option_names_are_suggested():
    with pytest.raises(ValueError, match=r"unknown solver 'mamll' \(did you mean 'maml'\?\); valid solvers: .*rad"):
        S.make("mamll")
    with pytest.raises(ValueError, match=r"unknown option\(s\) for solver 'rad': 'inner_step' \(did you mean 'inner_steps'\?\)"):
        S.make("rad", inner_step=3)
    with pytest.raises(TypeError, match="solver name must be a str"):
        S.get(3)


# ----------------------------------------------------------------------------------------------------------
# Accepted options never give silently wrong numbers: RAD against the closed form for any steps / step size
# ----------------------------------------------------------------------------------------------------------

QP = QuadraticProblem()
QT = quadratic_task(n=3, m=4, seed=0, init="random")
QX = QP.initial_params(QT)


def check_rad_case(steps: int, lr: float) -> None:
    count("rad steps/lr vs closed form")
    solver = S.make("rad", inner_steps=steps, inner_lr=lr)
    ref = QP.unrolled_hypergrad(QT, QX["x"], steps, lr)
    try:
        hg = solver.hypergrad(QP, QX, QT)
    except NonFiniteError as e:
        # allowed only when the exact unrolled answer is itself out of float64 range or the iteration diverges
        assert not torch.isfinite(ref).all() or ref.abs().max() > 1e100 or lr * 5.0 > 2.0, (steps, lr, str(e))
        assert "not finite" in str(e)
        return
    assert torch.isfinite(hg.grad["x"]).all()
    err = float((hg.grad["x"] - ref).norm() / ref.norm().clamp_min(1e-300))
    assert err < 1e-8, (steps, lr, err)


@FAST
@given(st.integers(0, 40), st.floats(1e-6, 3.0))
def test_fuzz_rad_accepted_options_are_exact_or_refused(steps, lr):
    check_rad_case(steps, lr)


@pytest.mark.slow
@SLOW
@given(st.integers(0, 60), st.floats(1e-6, 5.0))
def test_fuzz_rad_accepted_options_are_exact_or_refused_slow(steps, lr):
    check_rad_case(steps, lr)


# ----------------------------------------------------------------------------------------------------------
# Bad params dicts given to solvers on a model problem
# ----------------------------------------------------------------------------------------------------------

torch.manual_seed(0)
MP = ModelProblem(mlp([1, 8, 1]), "mse")
MTASK = SinusoidSource().sample(("train", 0, 0))
MX = MP.initial_params()
KEYS = list(MX)
PARAM_SOLVERS = ["maml", "rad", "fomaml", "imaml", "ift-cg", "trad", "reptile"]

MUTATIONS = ["nan", "inf", "int_dtype", "bool_dtype", "missing", "not_tensor", "non_str_key", "not_dict", "empty"]


@st.composite
def params_case(draw):
    solver = draw(st.sampled_from(PARAM_SOLVERS))
    key = draw(st.sampled_from(KEYS))
    mutation = draw(st.sampled_from(MUTATIONS))
    x = {k: v.clone() for k, v in MX.items()}
    if mutation in ("nan", "inf"):
        flat = x[key].view(-1)
        idx = draw(st.integers(0, flat.numel() - 1))
        flat[idx] = float("nan") if mutation == "nan" else draw(st.sampled_from([math.inf, -math.inf]))
    elif mutation == "int_dtype":
        x[key] = x[key].to(draw(st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8])))
    elif mutation == "bool_dtype":
        x[key] = x[key] > 0
    elif mutation == "missing":
        del x[key]
    elif mutation == "not_tensor":
        x[key] = draw(st.sampled_from(["tolist", "float", "numpy", "none"]))
        x[key] = {"tolist": MX[key].tolist(), "float": 0.5, "numpy": MX[key].numpy(), "none": None}[x[key]]
    elif mutation == "non_str_key":
        x[draw(st.sampled_from([0, 1.5, ("a",), b"w"]))] = x.pop(key)
    elif mutation == "not_dict":
        x = draw(st.sampled_from([list(x.values()), tuple(x.items()), MX[key], None, "x"]))
    elif mutation == "empty":
        x = {}
    return solver, key, mutation, x


def check_params_case(solver_name: str, key: str, mutation: str, x) -> None:
    count("bad params dicts")
    solver = S.make(solver_name, inner_steps=2)
    if mutation in ("nan", "inf"):
        # refused up front, naming the param: a -inf bias before a ReLU gives finite losses, so checking only the
        # losses and gradients would let the non-finite entry survive into the outer update
        with pytest.raises(ValueError, match=re.escape(f"[{key!r}] has non-finite entries")):
            solver.hypergrad(MP, x, MTASK)
        return
    with pytest.raises((ValueError, TypeError)) as e:
        solver.hypergrad(MP, x, MTASK)
    msg = str(e.value)
    if mutation in ("int_dtype", "bool_dtype", "missing", "not_tensor"):
        assert repr(key) in msg or key in msg, msg
    elif mutation == "non_str_key":
        assert "keys must be str" in msg, msg
    elif mutation == "not_dict":
        assert "must be a dict[str, Tensor]" in msg, msg
    elif mutation == "empty":
        assert "is empty" in msg, msg


@settings(FAST, max_examples=80)
@given(params_case())
def test_fuzz_bad_params(case):
    check_params_case(*case)


@pytest.mark.slow
@settings(SLOW, max_examples=1500)
@given(params_case())
def test_fuzz_bad_params_slow(case):
    check_params_case(*case)


@pytest.mark.parametrize("bad", ["shape", "float64"])
def test_mismatched_shape_or_dtype_names_the_param(bad):
    x = {k: v.clone() for k, v in MX.items()}
    x[KEYS[0]] = torch.zeros(3, 3) if bad == "shape" else x[KEYS[0]].double()
    with pytest.raises((ValueError, TypeError), match=KEYS[0].replace(".", r"\.")):
        S.make("maml").hypergrad(MP, x, MTASK)


def test_nonfinite_x_is_refused_naming_the_param():
    x = {k: v.clone() for k, v in MX.items()}
    x["0.bias"][0] = -math.inf
    with pytest.raises(ValueError, match=r"0\.bias"):
        S.make("maml").hypergrad(MP, x, MTASK)


def test_fad_runs_on_a_model_problem():
    hg = S.make("fad", inner_steps=2).hypergrad(MP, MX, MTASK)
    ref = S.make("rad", inner_steps=2).hypergrad(MP, MX, MTASK)
    for k in MX:
        torch.testing.assert_close(hg.grad[k], ref.grad[k], rtol=1e-4, atol=1e-6)
