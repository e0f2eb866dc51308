"""The solver registry, option validation and bad input: every mistake gets a clear error."""
import pytest
import torch

import metaray.solvers as S
from metaray.solvers.core import check_same_keys
from metaray.tasks import QuadraticProblem, quadratic_task

FOUNDATION = {"rad", "trad", "fad", "darts", "maml", "fomaml", "reptile", "metasgd"}


def test_registry_names_and_common_options():
    assert FOUNDATION <= set(S.names())
    assert S.names() == sorted(S.names())
    for name in S.names():
        fields = {row["name"] for row in S.get(name).Options.describe()}
        assert {"inner_steps", "inner_lr"} <= fields, name
        assert S.get(name).paper, f"{name} cites no paper"


def test_unknown_solver_names_valid_ones():
    with pytest.raises(ValueError, match=r"unknown solver 'mmal'.*did you mean 'maml'.*valid solvers:.*rad"):
        S.make("mmal")
    with pytest.raises(TypeError, match="solver name must be a str"):
        S.make(3)


def test_unknown_option_suggests_and_lists_valid():
    with pytest.raises(ValueError, match=r"'inner_step'.*did you mean 'inner_steps'.*valid options: inner_steps, inner_lr"):
        S.make("rad", inner_step=3)


@pytest.mark.parametrize(
    "options,exc,match",
    [
        ({"inner_steps": -1}, ValueError, "'inner_steps' must be >= 0"),
        ({"inner_lr": -0.1}, ValueError, "'inner_lr' must be > 0"),
        ({"inner_lr": 0.0}, ValueError, "'inner_lr' must be > 0"),
        ({"inner_lr": float("nan")}, ValueError, "'inner_lr' must be finite"),
        ({"inner_steps": 2.5}, TypeError, "'inner_steps' must be int"),
        ({"inner_steps": True}, TypeError, "'inner_steps' must be int"),
        ({"inner_lr": "0.1"}, TypeError, "'inner_lr' must be float"),
    ],
)
def test_bad_common_option_values(options, exc, match):
    with pytest.raises(exc, match=match):
        S.make("rad", **options)


def test_solver_specific_options_are_validated():
    with pytest.raises(ValueError, match="'truncate' must be > 0"):
        S.make("trad", truncate=0)
    with pytest.raises(ValueError, match="'fd_eps' must be > 0"):
        S.make("darts", fd_eps=-1.0)
    assert S.make("rad", inner_lr=1).options.inner_lr == 1.0  # ints are accepted for floats
    with pytest.raises(dataclass_error()):
        S.make("rad").options.inner_steps = 3  # frozen


def dataclass_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_bad_params_and_problems():
    P = QuadraticProblem()
    task = quadratic_task(3, 3)
    solver = S.make("rad", inner_steps=2)
    with pytest.raises(TypeError, match=r"outer params x must be a dict\[str, Tensor\], got list"):
        solver.hypergrad(P, [torch.ones(3)], task)
    with pytest.raises(TypeError, match=r"outer params x\['x'\] must be a torch.Tensor, got ndarray"):
        import numpy as np

        solver.hypergrad(P, {"x": np.ones(3)}, task)
    with pytest.raises(TypeError, match="must be a floating-point tensor, got dtype torch.int64"):
        solver.hypergrad(P, {"x": torch.ones(3, dtype=torch.long)}, task)
    with pytest.raises(ValueError, match="outer params x is empty"):
        solver.hypergrad(P, {}, task)
    with pytest.raises(TypeError, match="missing init_inner, inner_loss, outer_loss"):
        solver.hypergrad(object(), {"x": torch.ones(3)}, task)

    class Half(S.BilevelProblem):
        def init_inner(self, x, task):
            return {"y": x["x"]}

    with pytest.raises(TypeError, match="does not implement inner_loss, outer_loss"):
        solver.hypergrad(Half(), {"x": torch.ones(3)}, task)


def test_mismatched_keys_are_reported():
    a = {"w": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"missing \['b'\], unexpected \['c'\]"):
        check_same_keys(a, {"w": torch.zeros(2), "c": torch.zeros(1)}, "x", "grad")
    with pytest.raises(ValueError, match=r"grad\['w'\] has shape \(3,\)"):
        check_same_keys(a, {"w": torch.zeros(3), "b": torch.zeros(1)}, "x", "grad")


class Exploding(S.BilevelProblem):
    """An inner loss that overflows after a few steps of a too-large step size."""

    def init_inner(self, x, task):
        return {"y": x["x"]}

    def inner_loss(self, x, y, task):
        return (y["y"] ** 4).sum()

    def outer_loss(self, x, y, task):
        return (y["y"] ** 2).sum()


@pytest.mark.parametrize("name", sorted(FOUNDATION - {"metasgd"}))
def test_non_finite_losses_raise_with_location(name):
    x = {"x": torch.tensor([3.0, -2.0], dtype=torch.float64)}
    with pytest.raises(S.NonFiniteError, match="not finite|non-finite") as info:
        S.make(name, inner_steps=8, inner_lr=10.0).hypergrad(Exploding(), x, "task-17")
    assert info.value.task == "task-17"
    assert isinstance(info.value, ValueError)


def test_loss_must_be_a_scalar_tensor():
    class Vector(Exploding):
        def inner_loss(self, x, y, task):
            return y["y"] ** 2

    with pytest.raises(ValueError, match=r"inner_loss at inner step 0 must return a scalar, got a tensor of shape \(2,\)"):
        S.make("rad", inner_steps=1).hypergrad(Vector(), {"x": torch.ones(2)}, None)


def test_hypergrad_batch_checks_states_length_and_keeps_order():
    P = QuadraticProblem()
    tasks = [quadratic_task(3, 3, seed=s) for s in range(3)]
    x = P.initial_params(tasks[0])
    solver = S.make("rad", inner_steps=3)
    batch = solver.hypergrad_batch(P, x, tasks)
    for hg, t in zip(batch, tasks):
        assert torch.equal(hg.grad["x"], solver.hypergrad(P, x, t).grad["x"])
    with pytest.raises(ValueError, match="got 3 tasks but 2 states"):
        solver.hypergrad_batch(P, x, tasks, states=[None, None])


@pytest.mark.parametrize("name", ["rad", "trad", "fad", "darts", "maml", "fomaml", "reptile", "imaml", "ift-cg", "ift-neumann"])
def test_evaluate_adapts_like_hypergrad_without_a_gradient(name):
    """Meta-validation/test uses solver.evaluate: the same inner solution the hypergradient is taken at."""
    P = QuadraticProblem()
    task = quadratic_task(4, 4, seed=4, init="x")
    x = P.initial_params(task)
    solver = S.make(name, inner_steps=4, inner_lr=0.1)
    hg, ev = solver.hypergrad(P, x, task), solver.evaluate(P, x, task)
    assert ev.outer_loss == pytest.approx(hg.outer_loss, rel=1e-12)
    assert ev.inner_loss == pytest.approx(hg.inner_loss, rel=1e-12)
    assert all(float(g.abs().max()) == 0.0 for g in ev.grad.values())


def test_ridge_evaluate_uses_the_closed_form_head():
    from metaray.tasks import FeatureProblem, GaussianClusterImages
    from metaray.tasks.models import conv_block

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(conv_block(1, 4), torch.nn.Flatten())
    problem = FeatureProblem(backbone, ways=5)
    source = GaussianClusterImages(ways=5, shots=1, queries=5)
    task = source.sample(("test", 0, 0))
    x = problem.initial_params()
    solver = S.make("ridge")
    hg, ev = solver.hypergrad(problem, x, task), solver.evaluate(problem, x, task)
    assert ev.outer_loss == pytest.approx(hg.outer_loss, rel=1e-6)
