"""``keep_host_memory`` (cluster/host_memory.py): freed host memory stays in the process for reuse, so a tensor
above glibc's 32 MiB mmap ceiling, allocated and freed every step, page-faults once rather than every time; in a
fresh process, in a non-main thread (where Ray actors compute), through ``ClusterConfig`` and the ``[cluster]``
setting, and on real Ray actors, whose ``info()`` reports it and their page faults."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import ray
import torch

from metaray.cluster import ClusterConfig, WorkerPool, WorkerSpec, keep_host_memory
from metaray.platform.config import ClusterSettings, ConfigError
from metaray.tasks import ModelProblem, SinusoidSource, mlp

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")

# 64 MiB float32 tensors (over the 32 MiB ceiling), allocated, written and freed ROUNDS times, in the main thread or
# in a second one; prints the page faults of the loop. Written pages are what fault: torch.empty alone touches none.
_FAULTS = textwrap.dedent("""
    import sys, threading, torch
    from metaray.cluster.host_memory import host_page_faults, keep_host_memory
    keep, in_thread = sys.argv[1] == "1", sys.argv[2] == "1"
    applied = keep_host_memory() if keep else False
    out = {}
    def loop():
        for _ in range(WARM):  # the first ones fault either way, while the heap takes its shape
            torch.ones(1 << 24)
        before = host_page_faults()
        for _ in range(ROUNDS):
            t = torch.ones(1 << 24)
            del t
        out["faults"] = host_page_faults() - before
    if in_thread:
        th = threading.Thread(target=loop); th.start(); th.join()
    else:
        loop()
    print(applied, out["faults"])
""")
ROUNDS, WARM = 20, 10
PAGES = (64 << 20) // 4096  # one 64 MiB tensor's pages


def _faults(keep: bool, in_thread: bool) -> tuple[bool, int]:
    # a thread's allocations reach the padded heap with one arena for all threads: what the pool sets for its actors
    env = dict(os.environ, MALLOC_ARENA_MAX="1") if keep and in_thread else None
    out = subprocess.run([sys.executable, "-c", _FAULTS.replace("ROUNDS", str(ROUNDS)).replace("WARM", str(WARM)), str(int(keep)), str(int(in_thread))],
                         capture_output=True, text=True, timeout=120, check=True, env=env).stdout.split()
    return out[0] == "True", int(out[1])


@glibc
@pytest.mark.parametrize("in_thread", [False, True], ids=["main thread", "second thread"])
def test_a_freed_tensor_above_32_mib_is_reused_instead_of_faulting_anew(in_thread):
    applied, returned = _faults(keep=False, in_thread=in_thread)
    assert not applied
    assert returned >= ROUNDS * PAGES * 0.9  # glibc's default: each 64 MiB tensor is fresh pages from the OS
    applied, kept = _faults(keep=True, in_thread=in_thread)
    assert applied
    # reused: the heap can take a few rounds more to settle (glibc places the block anew each time), then no faults
    assert kept * 5 < returned


def test_bad_pad_bytes_say_what_is_valid():
    for bad in (0, -1, 2**31, 1.5, True, "1G"):
        with pytest.raises(ValueError, match=r"pad_bytes must be an int of bytes in \(0, 2\*\*31\)"):
            keep_host_memory(bad)


def test_the_setting_goes_through_cluster_config_and_the_cluster_section():
    assert ClusterConfig().keep_host_memory is True  # on by default
    assert ClusterSettings(keep_host_memory=False).cluster_config().keep_host_memory is False
    assert ClusterSettings().cluster_config().keep_host_memory is True
    with pytest.raises(ValueError, match="keep_host_memory.*a bool"):
        ClusterConfig(keep_host_memory="yes")
    with pytest.raises(ConfigError, match="keep_host_memory"):
        ClusterSettings(keep_host_memory=1)


@pytest.fixture(scope="module")
def two_cpus():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _spec(hidden: int) -> WorkerSpec:
    torch.manual_seed(0)
    return WorkerSpec(problem=functools.partial(ModelProblem, mlp([1, hidden, hidden, 1]), "mse"), solver="fomaml",
                      solver_options={"inner_steps": 1, "inner_lr": 0.001}, source=SinusoidSource(shots=5, queries=5),
                      dtype="float32")


def _x(hidden: int) -> dict:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in mlp([1, hidden, hidden, 1]).named_parameters()}


@glibc
@pytest.mark.slow
def test_ray_actors_keep_freed_memory_and_report_their_page_faults(two_cpus):
    """d = 9.0M (36 MiB float32 gradients, 72 MiB int64 encodings): an actor that returns freed memory faults in
    every gradient-sized tensor anew at each step, one that keeps it hardly at all; same gradient bits."""
    hidden = 3000
    x, faults, grads = _x(hidden), {}, {}
    for keep in (False, True):
        cfg = ClusterConfig(num_workers=1, num_cpus_per_worker=1, metrics=False, reduction="actors", keep_host_memory=keep)
        with WorkerPool(_spec(hidden), cfg, f"hostmem-{keep}") as pool:
            for step in range(2):  # warm-up: the first steps fault in their memory either way
                pool.step(x, [("train", step, i) for i in range(2)])
            before = pool.workers()[0]
            grads[keep] = pool.step(x, [("train", 2, i) for i in range(2)]).grad
            after = pool.workers()[0]
        assert before["host_memory_kept"] is keep and after["pid"] == before["pid"]
        faults[keep] = after["host_page_faults"] - before["host_page_faults"]
    d = sum(v.numel() for v in x.values())
    assert faults[False] > 4 * d // 1024, faults  # at least four 36 MiB tensors' pages, fresh from the OS
    assert faults[True] * 5 < faults[False], faults
    assert all(torch.equal(grads[True][k], grads[False][k]) for k in x)

