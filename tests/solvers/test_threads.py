"""solvers/threads.py: tasks computed on threads give the one-thread loop's bits (float64, MLP and conv4 with
BatchNorm, first and second order, implicit), really run at once on private problem copies, and a failing task
fails the call with its own error and leaves the threads usable."""
from __future__ import annotations

import math
import threading

import pytest
import torch

import metaray.solvers as S
from metaray.solvers.core import NonFiniteError
from metaray.solvers.threads import TaskThreads
from metaray.tasks import Conv4, Episode, ModelProblem, SinusoidSource, mlp

D64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the loop's tasks with one intra-op thread, as each task thread computes
    yield
    torch.set_num_threads(before)


def sine_setup(n=5):
    torch.manual_seed(0)
    problem = ModelProblem(mlp([1, 40, 40, 1]).double(), "mse")
    return problem, problem.initial_params(), [SinusoidSource(dtype=D64).sample(("train", 0, i)) for i in range(n)]


def conv_setup(n=3):
    torch.manual_seed(0)
    problem = ModelProblem(Conv4(ways=3, hidden=8, image_size=16).double(), "cross_entropy")
    g = torch.Generator().manual_seed(1)
    tasks = [Episode(torch.randn(3, 1, 16, 16, generator=g, dtype=D64), torch.arange(3),
                     torch.randn(6, 1, 16, 16, generator=g, dtype=D64), torch.arange(3).repeat(2)) for _ in range(n)]
    return problem, problem.initial_params(), tasks


@pytest.mark.parametrize("setup,solver,options", [
    (sine_setup, "maml", {"inner_steps": 3, "inner_lr": 0.01}),
    (sine_setup, "fomaml", {"inner_steps": 3, "inner_lr": 0.01}),
    (sine_setup, "imaml", {"inner_steps": 4, "inner_lr": 0.05, "lam": 1.0, "cg_steps": 5}),
    (conv_setup, "maml", {"inner_steps": 2, "inner_lr": 0.4}),
])
def test_threads_give_the_loops_bits(setup, solver, options):
    problem, x, tasks = setup()
    s = S.make(solver, **options)
    loop = [s.hypergrad(problem, x, t) for t in tasks]
    threads = TaskThreads(problem, threads=3)
    try:
        got = threads.hypergrads(s, x, tasks)
    finally:
        threads.close()
    assert len(got) == len(tasks)
    for a, b in zip(got, loop):
        assert all(torch.equal(a.grad[k], b.grad[k]) for k in x)
        assert a.outer_loss == b.outer_loss and a.inner_loss == b.inner_loss
    assert not all(torch.equal(got[0].grad[k], got[1].grad[k]) for k in x)  # the tasks differ: order is checked


_MEET = threading.Barrier(2, timeout=30)  # module level: problem copies are deep copies, a lock would not be shared


class MeetingProblem(ModelProblem):
    """Each task's first inner loss waits until another task's has begun (a barrier of 2): a call of two tasks
    only finishes if they run at once. Records which problem object served each thread."""

    seen: dict = {}

    def inner_loss(self, x, y, task):
        if not task.info.get("met"):
            task.info["met"] = True
            MeetingProblem.seen[threading.get_ident()] = id(self)
            _MEET.wait()
        return super().inner_loss(x, y, task)


def test_tasks_run_at_once_each_on_its_own_problem_copy():
    torch.manual_seed(0)
    problem = MeetingProblem(mlp([1, 8, 1]).double(), "mse")
    x, src = problem.initial_params(), SinusoidSource(dtype=D64)
    threads = TaskThreads(problem, threads=2)
    try:
        got = threads.hypergrads(S.make("maml", inner_steps=1, inner_lr=0.01), x, [src.sample(("train", 0, i)) for i in range(2)])
    finally:
        threads.close()
    assert len(got) == 2 and len(MeetingProblem.seen) == 2
    assert len(set(MeetingProblem.seen.values())) == 2  # two threads, two problem objects
    assert threading.get_ident() not in MeetingProblem.seen


def test_a_failing_task_fails_the_call_with_its_error_and_the_threads_stay_usable():
    problem, x, tasks = sine_setup(4)
    bad = Episode(tasks[2].support_x, tasks[2].support_y, tasks[2].query_x, torch.full_like(tasks[2].query_y, math.nan))
    s = S.make("maml", inner_steps=1, inner_lr=0.01)
    threads = TaskThreads(problem, threads=2)
    try:
        with pytest.raises(NonFiniteError):
            threads.hypergrads(s, x, tasks[:2] + [bad] + tasks[3:])
        again = threads.hypergrads(s, x, tasks)  # every problem copy came back
        assert all(torch.equal(a.grad[k], s.hypergrad(problem, x, t).grad[k]) for a, t in zip(again, tasks) for k in x)
    finally:
        threads.close()


def test_bad_arguments_say_what_is_valid():
    problem, x, tasks = sine_setup(2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be an int >= 1"):
            TaskThreads(problem, threads=bad)
    threads = TaskThreads(problem, threads=2)
    with pytest.raises(ValueError, match="got 2 tasks but 1 states"):
        threads.hypergrads(S.make("fomaml"), x, tasks, states=[None])
    threads.close()
