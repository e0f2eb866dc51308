"""Fault injection on a real local Ray cluster: killed actors, lost nodes, hostile numbers, a killed driver.

Every run must finish with outer params bitwise identical to an uninterrupted run (the in-process pool computes
the same tasks with the same code, and aggregation is in key order), and the step results must record what
happened. The fast subset (one actor kill, NaN / exploding-loss injection, driver kill + resume in-process) is
in the default selection; the rest is marked slow.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import faultkit as K
from metaray.cluster import ClusterConfig, InProcessPool, NonFiniteStepError, WorkerPool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
ROOT = Path(__file__).resolve().parents[2]


def reference(steps: int, n_tasks: int = 4):
    x, _ = K.run_steps(InProcessPool(K.spec()), steps, n_tasks)
    return x


def kill_later(pids: list[int], delay: float) -> threading.Timer:
    def go():
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    t = threading.Timer(delay, go)
    t.start()
    return t


def test_kill_one_actor_mid_step(ray_local):
    """Through the platform's MetaLearner: same outer params as without the fault, and its metrics row records
    the restart and the re-dispatches."""
    ref = K.learner(InProcessPool(K.spec()), 3)
    for _ in range(3):
        ref.step()
    with WorkerPool(K.spec(delay=0.3), ClusterConfig(num_workers=2, metrics=False), "rel-kill1") as pool:
        meta, rows = K.learner(pool, 3), []
        for s in range(3):
            if s == 1:
                killed = pool.pids[0]
                kill_later([killed], 0.15)  # both tasks of worker 0 are queued or running by then
            rows.append(meta.step())
        assert killed not in pool.worker_pids()  # a new process took its place
    assert torch.equal(meta.x["x"], ref.x["x"])
    assert rows[1]["restarts"] >= 1 and rows[1]["retries"] >= 1 and rows[1]["train_pool_restarts"] >= 1, rows[1]
    assert rows[0]["restarts"] == rows[2]["restarts"] == 0


def test_nonfinite_task_never_reaches_the_meta_learner_update():
    """In-process (same InnerLearner code): step 0 is clean, step 1 has a NaN task; the learner's x and step
    count stay at their step-0 values and the error names the task key."""
    meta = K.learner(InProcessPool(K.spec(poisons=((2, "nan"),), poison_steps=(1,))), 3)
    meta.step()
    after_first = {k: v.clone() for k, v in meta.x.items()}
    with pytest.warns(RuntimeWarning):
        with pytest.raises(NonFiniteStepError, match=r"\('train', 1, 2\)"):
            meta.step()
    assert meta.step_count == 1 and torch.equal(meta.x["x"], after_first["x"])


def test_nan_and_exploding_tasks_are_caught_before_the_update(ray_local):
    poisons = ((10, "nan"), (11, "explode"))
    with WorkerPool(K.spec(poisons=poisons), ClusterConfig(num_workers=2, metrics=False), "rel-nan") as pool:
        x = K.x0()
        before = x["x"].clone()
        for index, where in ((10, "outer_loss"), (11, "inner_loss")):
            bad = ("train", 0, index)
            with pytest.warns(RuntimeWarning, match="retrying once"):
                with pytest.raises(NonFiniteStepError) as e:
                    pool.step(x, [("train", 0, 0), bad, ("train", 0, 1)])
            assert e.value.task == bad
            assert str(bad) in str(e.value) and where in str(e.value) and "step abandoned" in str(e.value)
            assert torch.equal(x["x"], before)  # nothing came back to update x with
        # the pool is still usable, and its next result is exact
        r = pool.step(x, K.keys(0))
        ref = InProcessPool(K.spec()).step(x, K.keys(0))
        assert torch.equal(r.grad["x"], ref.grad["x"])


def test_driver_killed_then_resumed_inprocess(tmp_path):
    killed_dir, ref_dir = run_killed_and_reference(tmp_path, backend="inprocess", steps=8, kill_at=5)
    assert_same_final(killed_dir, ref_dir)


# ----------------------------------------------------------------------------------------------------------
# Driver kill + resume
# ----------------------------------------------------------------------------------------------------------

CONFIG = """
name = "rel-resume"
[problem]
name = "quadratic"
[solver]
name = "rad"
inner_steps = 5
inner_lr = 0.1
[tasks]
meta_batch_size = 2
val_tasks = 2
test_tasks = 0
[outer]
optimizer = "adam"
lr = 0.05
[cluster]
backend = "{backend}"
num_workers = 2
[run]
steps = {steps}
dtype = "float64"
checkpoint_every = 1
run_dir = "{run_dir}"
plots = false
progress = false
baseline = false
"""

DRIVER = """
import os, signal, sys
from metaray.platform import learner as L
from metaray.platform.cli import main
real_step = L.MetaLearner.step
def step(self):
    if self.step_count == {kill_at}:  # SIGKILL the driver in the middle of this outer step
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self)
L.MetaLearner.step = step
sys.exit(main(["run", sys.argv[1]]))
"""


def write_config(path: Path, backend: str, steps: int, run_dir: Path) -> Path:
    path.write_text(CONFIG.format(backend=backend, steps=steps, run_dir=run_dir))
    return path


def run_killed_and_reference(tmp_path: Path, backend: str, steps: int, kill_at: int) -> tuple[Path, Path]:
    from metaray.platform import launch, load_config, resume

    killed_dir, ref_dir = tmp_path / "killed", tmp_path / "reference"
    cfg = write_config(tmp_path / "killed.toml", backend, steps, killed_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Output goes to a file, not a pipe: the killed driver's Ray processes may keep a pipe open after it dies,
    # and reading a pipe to its end would then wait for them.
    log = tmp_path / "killed-driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER.format(kill_at=kill_at), str(cfg)], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the driver did not reach its kill point in 300 s: " + log.read_text()[-2000:])
    assert code == -signal.SIGKILL, log.read_text()[-2000:]
    latest = json.loads((killed_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == kill_at  # the last checkpoint before the kill
    assert not (killed_dir / "final_params.pt").exists()
    result = resume(killed_dir)
    assert result.metrics["resumed"] and result.metrics["steps"] == steps
    launch(load_config(write_config(tmp_path / "ref.toml", backend, steps, ref_dir)))
    return killed_dir, ref_dir


def assert_same_final(a: Path, b: Path) -> None:
    """Same final params, and the same metrics rows: no step lost or repeated across the kill."""
    from metaray.platform.reports import read_metrics

    ta, tb = read_metrics(a), read_metrics(b)
    assert ta.column("step").to_pylist() == tb.column("step").to_pylist() == list(range(1, tb.num_rows + 1))
    assert ta.column("outer_loss").to_pylist() == tb.column("outer_loss").to_pylist()
    xa = torch.load(a / "final_params.pt", weights_only=True)
    xb = torch.load(b / "final_params.pt", weights_only=True)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert torch.equal(xa[k], xb[k]), (k, xa[k], xb[k])


def test_resume_falls_back_to_previous_good_checkpoint(tmp_path):
    from metaray.platform import launch, load_config, resume

    run_dir = tmp_path / "run"
    launch(load_config(write_config(tmp_path / "a.toml", "inprocess", 6, run_dir)))
    ckpts = sorted((run_dir / "checkpoints").glob("ckpt_*.pt"))
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:-100])  # damage the newest
    with pytest.warns(RuntimeWarning, match="skipped bad checkpoint"):
        result = resume(run_dir, steps=8)
    assert result.metrics["steps"] == 8


# ----------------------------------------------------------------------------------------------------------
# Slow: more faults
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_driver_killed_then_resumed_on_ray(tmp_path, ray_local):
    killed_dir, ref_dir = run_killed_and_reference(tmp_path, backend="ray", steps=10, kill_at=6)
    assert_same_final(killed_dir, ref_dir)


@pytest.mark.slow
def test_kill_two_actors_at_once(ray_local):
    ref = reference(4, n_tasks=6)
    cfg = ClusterConfig(num_workers=3, num_cpus_per_worker=0.5, metrics=False)  # 3 actors on a 2-CPU machine
    with WorkerPool(K.spec(delay=0.3), cfg, "rel-kill2") as pool:
        x, results = K.run_steps(pool, 4, 6, on_step=lambda s, p: s == 2 and kill_later(p.pids[:2], 0.15))
    assert torch.equal(x["x"], ref["x"])
    assert results[2].restarts >= 2, results[2].events
    assert {e.split(" died")[0] for e in results[2].events if "died while computing" in e} == {"worker 0", "worker 1"}


@pytest.mark.slow
def test_repeated_kills_past_max_restarts_replace_the_actor(ray_local):
    """max_restarts=1 and worker 0 killed in 3 consecutive steps: Ray restarts it once, then it is dead for good
    and the pool replaces it under a fresh name (``-r1``: Ray may not have released the dead one's name yet),
    and Ray restarts the replacement after the third kill. Same outer params as without the faults."""
    ray = ray_local
    ref = reference(5)
    cfg = ClusterConfig(num_workers=2, metrics=False, max_restarts=1)
    with WorkerPool(K.spec(delay=0.3), cfg, "rel-killn") as pool:
        x, results = K.run_steps(pool, 5, on_step=lambda s, p: s in (1, 2, 3) and kill_later([p.pids[0]], 0.15))
        # the replacement answers under its own name, and it is the pool's worker 0
        assert ray.get(ray.get_actor("metaray-rel-killn-inner-0-r1").pid.remote()) == pool.worker_pids()[0]
    assert torch.equal(x["x"], ref["x"])
    events = [e for r in results for e in r.events]
    assert any("worker 0 is dead for good: replaced (metaray-rel-killn-inner-0 -> metaray-rel-killn-inner-0-r1)" in e
               for e in events), events
    assert sum(r.restarts for r in results) >= 3
    assert [r.restarts for r in results][0] == results[-1].restarts == 0


NODE_SCRIPT = """
import json, sys, threading, time
sys.path.insert(0, {kit!r})
import cloudpickle, ray, torch
import faultkit as K
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from metaray.cluster import ClusterConfig, InProcessPool, WorkerPool

# The removed node is declared dead after 3 health checks in a row, 1 s apart, go unanswered for 2 s each (Ray's
# default: 5 checks 3 s apart, ~10 s more a run); 2 s leaves a live raylet on a loaded machine time to answer
c = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "dashboard_port": 8365, "_system_config": {{
    "health_check_period_ms": 1000, "health_check_timeout_ms": 2000, "health_check_failure_threshold": 3}}}})
try:
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address)
    cloudpickle.register_pickle_by_value(K); ray.cloudpickle.register_pickle_by_value(K)
    pool = WorkerPool(K.spec(delay=0.3), ClusterConfig(num_workers=2, strategy="SPREAD", metrics=False,
                      placement_timeout_s=60, collective={collective!r}), "rel-node")
    where = {{a.name: a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.name.startswith("metaray-rel-node")}}
    victim = next(n for n in nodes if n.node_id in where.values())
    out = {{"actors_on": sorted(where.values()), "victim": victim.node_id}}

    def inject(step, p):
        if step == 1:
            threading.Timer(0.15, lambda: c.remove_node(victim, allow_graceful=False)).start()

    t = time.time()
    x, results = K.run_steps(pool, 4, on_step=inject)
    out["seconds"] = time.time() - t
    ref, _ = K.run_steps(InProcessPool(K.spec()), 4)
    out["identical"] = bool(torch.equal(x["x"], ref["x"]))
    out["events"] = [e for r in results for e in r.events]
    out["restarts"] = sum(r.restarts for r in results)
    out["group_builds"] = pool._group.builds if pool._group is not None else None
    pool.shutdown()
finally:
    ray.shutdown()
    c.shutdown()
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("collective", ["object_store", "gloo"])
def test_remove_a_worker_node(tmp_path, collective):
    """A 3-node ray.cluster_utils.Cluster (run in a subprocess: one Ray per process); the node holding an
    inner learner is removed mid-step; the actor comes back on the spare node. With the actors' reduction through
    Ray's object store, and through a gloo group (rebuilt with the new actor on the spare node)."""
    script = NODE_SCRIPT.format(kit=str(Path(K.__file__).parent), collective=collective)
    # A cluster_utils head writes /tmp/ray/ray_current_cluster and leaves it behind: a later plain ray.init()
    # on this machine would try to join the dead cluster. Put the pointer back the way it was.
    pointer = Path("/tmp/ray/ray_current_cluster")
    before = pointer.read_bytes() if pointer.exists() else None
    try:
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=400,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        if before is None:
            pointer.unlink(missing_ok=True)
        else:
            pointer.write_bytes(before)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, r.stderr[-3000:]
    out = json.loads(line[0][7:])
    print(out)
    assert out["identical"], out
    assert out["restarts"] >= 1 and any("died" in e for e in out["events"]), out
    if collective == "gloo":  # the group was built, and built again with the actor that came back
        assert out["group_builds"] >= 2, out
