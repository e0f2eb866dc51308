"""GPU checks (marked ``gpu``; skipped cleanly without a CUDA device, as in CI): hypergradients computed on the GPU
equal the CPU's, and inner-learner actors with fractional GPUs (two per GPU) train to the same outer params as the
in-process CPU pool."""
from __future__ import annotations

import functools

import pytest
import torch

import metaray.solvers as S
from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool, WorkerSpec
from metaray.tasks import ModelProblem, QuadraticProblem, SinusoidSource, mlp, quadratic_task

pytestmark = pytest.mark.gpu
D = torch.float64


def _to(obj, device):
    if isinstance(obj, dict):
        return {k: v.to(device) for k, v in obj.items()}
    return type(obj)(*(t.to(device) for t in obj))


@pytest.mark.parametrize("solver", ["maml", "rad", "imaml", "ift-cg", "fomaml"])
def test_hypergradients_on_cuda_equal_the_cpu(solver):
    torch.manual_seed(0)
    model = mlp([1, 40, 40, 1]).double()
    task = SinusoidSource(dtype=D).sample(("train", 0, 0))
    x = {k: v.detach().clone() for k, v in model.named_parameters()}
    s = S.make(solver, inner_steps=3, inner_lr=0.01)
    cpu = s.hypergrad(ModelProblem(model, "mse"), x, task)
    gpu = s.hypergrad(ModelProblem(model.cuda(), "mse"), _to(x, "cuda"), _to(task, "cuda"))
    for k in x:
        assert gpu.grad[k].is_cuda
        torch.testing.assert_close(gpu.grad[k].cpu(), cpu.grad[k], rtol=1e-9, atol=1e-12)
    assert gpu.outer_loss == pytest.approx(cpu.outer_loss, rel=1e-9)


@pytest.mark.parametrize("solver", ["maml", "imaml", "ift-cg"])
def test_batched_hypergradients_on_cuda_equal_the_cpu_loop(solver):
    """The vmapped path (batched CG for the implicit solvers) on the GPU against the CPU task loop."""
    torch.manual_seed(0)
    model = mlp([1, 40, 40, 1]).double()
    src = SinusoidSource(dtype=D)
    tasks = [src.sample(("train", 0, i)) for i in range(4)]
    x = {k: v.detach().clone() for k, v in model.named_parameters()}
    s = S.make(solver, inner_steps=3, inner_lr=0.01)
    cpu = [s.hypergrad(ModelProblem(model, "mse"), x, t) for t in tasks]
    gpu = s.hypergrad_batch(ModelProblem(model.cuda(), "mse"), _to(x, "cuda"), [_to(t, "cuda") for t in tasks])
    for c, g in zip(cpu, gpu):
        for k in x:
            assert g.grad[k].is_cuda
            torch.testing.assert_close(g.grad[k].cpu(), c.grad[k], rtol=1e-8, atol=1e-11)


def test_bf16_inner_loop_on_cuda_is_close_to_fp32():
    from metaray.tasks.precision import AutocastInner, check_precision

    check_precision("bf16", "float32", "cuda")
    torch.manual_seed(0)
    model = mlp([1, 40, 40, 1]).cuda()
    task = _to(SinusoidSource().sample(("train", 0, 0)), "cuda")
    x = {k: v.detach().clone() for k, v in model.named_parameters()}
    P = ModelProblem(model, "mse")
    s = S.make("maml", inner_steps=5, inner_lr=0.01)
    ref, low = s.hypergrad(P, x, task), s.hypergrad(AutocastInner(P, "cuda"), x, task)
    err = sum(float((low.grad[k] - ref.grad[k]).norm()) ** 2 for k in x) ** 0.5 / sum(float(ref.grad[k].norm()) ** 2 for k in x) ** 0.5
    assert 1e-6 < err < 0.05 and low.grad["0.weight"].dtype == torch.float32


def test_closed_form_on_cuda():
    P, task = QuadraticProblem(), quadratic_task(4, 4, seed=3)
    x = P.initial_params(task)
    exact = P.unrolled_hypergrad(task, x["x"], 5, 0.15)
    hg = S.make("rad", inner_steps=5, inner_lr=0.15).hypergrad(P, _to(x, "cuda"), _to_task(task))
    torch.testing.assert_close(hg.grad["x"].cpu(), exact, rtol=1e-9, atol=1e-12)


def _to_task(task):
    import dataclasses

    return dataclasses.replace(task, **{f.name: getattr(task, f.name).cuda() for f in dataclasses.fields(task)
                                        if isinstance(getattr(task, f.name), torch.Tensor)})


def _sine_training(solver: str, tasks: int):
    """(spec, train): a float64 sinusoid MLP spec, and 3 outer SGD steps of ``tasks`` tasks on a pool."""
    spec = WorkerSpec(problem=functools.partial(ModelProblem, mlp([1, 40, 40, 1]), "mse"), solver=solver,
                      solver_options={"inner_steps": 2, "inner_lr": 0.01}, source=SinusoidSource(dtype=D), dtype="float64")
    torch.manual_seed(0)
    x0 = {k: v.detach().double() for k, v in mlp([1, 40, 40, 1]).named_parameters()}

    def train(pool):
        x = dict(x0)
        for s in range(3):
            r = pool.step(x, [("train", s, i) for i in range(tasks)])
            x = {k: x[k] - 0.01 * r.grad[k] for k in x}
        return x

    return spec, train


def test_two_actors_share_one_gpu_and_match_the_cpu():
    import ray

    spec, train = _sine_training("maml", 4)
    with InProcessPool(spec) as p:
        ref = train(p)
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        cfg = ClusterConfig(num_workers=2, num_cpus_per_worker=0.5, num_gpus_per_worker=0.5, metrics=False)
        with WorkerPool(spec, cfg, "gpu-share") as pool:
            assert [pool.worker_info[i]["device"] for i in range(2)] == ["cuda", "cuda"]
            x = train(pool)
    finally:
        ray.shutdown()
    for k in ref:
        torch.testing.assert_close(x[k], ref[k], rtol=1e-9, atol=1e-12)


def test_reduction_through_nccl_and_gloo_groups_on_the_gpu_gives_the_object_store_bits():
    """One actor with a whole GPU: collective 'auto' picks NCCL (a group of one rank: NCCL refuses two ranks on
    one GPU, and this machine has one); two actors sharing the GPU reduce through gloo. Both give the bits of
    the object-store transport on the same devices, and stay close to the CPU pool."""
    import ray

    spec, train = _sine_training("fomaml", 5)
    with InProcessPool(spec) as p:
        ref = train(p)
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)
    runs = {}
    try:
        for name, n, gpus, collective in [("nccl", 1, 1, "auto"), ("store-1", 1, 1, "object_store"),
                                          ("gloo", 2, 0.5, "gloo"), ("store-2", 2, 0.5, "object_store")]:
            cfg = ClusterConfig(num_workers=n, num_cpus_per_worker=0.5, num_gpus_per_worker=gpus, metrics=False,
                                collective=collective)
            with WorkerPool(spec, cfg, f"gpu-{name}") as pool:
                runs[name] = train(pool)
                assert (pool._group.backend if pool._group else None) == {"nccl": "nccl", "gloo": "gloo"}.get(name)
    finally:
        ray.shutdown()
    for a, b in [("nccl", "store-1"), ("gloo", "store-2")]:
        for k in ref:
            assert torch.equal(runs[a][k], runs[b][k]), (a, k)
    for k in ref:
        torch.testing.assert_close(runs["nccl"][k], ref[k], rtol=1e-9, atol=1e-12)


def test_tasks_loaded_ahead_on_cuda_through_pinned_memory_equal_the_cpu_tasks():
    """cluster/loader.py on a GPU: loaded on another thread, copied from pinned memory on a side stream; the task
    the compute stream gets equals the CPU task, and a kernel on it sees the copied values."""
    import threading

    from metaray.cluster.loader import TaskLoader

    src = SinusoidSource(dtype=D)
    keys = [("train", 0, i) for i in range(6)]
    loader = TaskLoader(src, torch.device("cuda"), torch.float32)
    ahead = threading.Thread(target=loader.fetch, args=(keys,))
    ahead.start()
    ahead.join()
    for key in keys:
        got, want = loader.take(key), src.sample(key)
        assert got.support_x.is_cuda and got.support_x.dtype == torch.float32
        assert torch.equal((got.query_y * 2).cpu(), (want.query_y.float() * 2))
        assert torch.equal(got.support_x.cpu(), want.support_x.float())
    assert loader.stats()["hits"] == 6
