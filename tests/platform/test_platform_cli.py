"""Every CLI command, through main(argv) and as real subprocesses: run, eval, resume (after SIGKILL of the
driver), solvers, datasets, demo (on a local Ray cluster with 2 actors), and submit (real Ray Jobs, slow)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from platform_pools import LocalPool

import metaray
from metaray.platform import cli
from metaray.platform.checkpoint import latest_checkpoint, load_latest

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

CONFIG = """
name = "cli-test"
[problem]
name = "sinusoid"
shots = 5
queries = 5
hidden = 40
[solver]
name = "maml"
inner_steps = 2
inner_lr = 0.02
[tasks]
meta_batch_size = 4
val_tasks = 4
test_tasks = 20
[outer]
lr = 0.003
schedule = "cosine"
[cluster]
backend = "inprocess"
num_workers = 2
[run]
steps = STEPS
checkpoint_every = 5
val_every = 50
progress = false
plots = false
"""


def write_config(tmp_path, steps):
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG.replace("STEPS", str(steps)))
    return path


def test_run_eval_resume_solvers_datasets(tmp_path, capsys):
    cfg = write_config(tmp_path, 6)
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(cfg), "--run-dir", str(run_dir), "--set", "tasks.test_tasks=10"]) == 0
    out = capsys.readouterr().out
    assert f"run directory: {run_dir}" in out and "meta-test" in out and "(95% CI, 10 tasks)" in out and "baseline" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert cli.main(["eval", str(run_dir), "--tasks", "10", "--quiet"]) == 0
    assert f"{summary['test']['mean']:.4f}" in capsys.readouterr().out  # eval re-tests the same params
    assert cli.main(["resume", str(run_dir), "--steps", "8"]) == 0
    assert load_latest(run_dir)[1]["step"] == 8
    capsys.readouterr()
    assert cli.main(["solvers"]) == 0
    out = capsys.readouterr().out
    for name in metaray.solvers.names():
        assert f"\n{name} " in out
    assert "Finn, Abbeel, Levine 2017" in out and "inner_steps=1" in out
    assert cli.main(["solvers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(metaray.solvers.names())
    assert cli.main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "glyphs" in out and "digits" in out and "fewshot-maml" in out and "hyper-cleaning" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    cfg = write_config(tmp_path, 2)
    cfg.write_text(cfg.read_text().replace("meta_batch_size", "meta_bach_size"))
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'meta_batch_size'?" in err and "Traceback" not in err
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "not a metaray run directory" in capsys.readouterr().err
    assert cli.main(["run", str(write_config(tmp_path, 2)), "--set", "outer.lr=-1"]) == 2
    assert "outer.lr must be > 0, got -1" in capsys.readouterr().err


def test_kill_the_driver_then_resume_gives_the_uninterrupted_params(tmp_path):
    steps = 200  # the kill lands at the first checkpoint (step 5); the rest only has to outlast it
    cfg_path = write_config(tmp_path, steps)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([PY, "-m", "metaray.platform.cli", "run", str(cfg_path), "--run-dir", str(run_dir)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while latest_checkpoint(run_dir) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    killed_at = load_latest(run_dir)[1]["step"]
    assert 5 <= killed_at < steps and not (run_dir / "final_params.pt").exists()
    done = subprocess.run([PY, "-m", "metaray.platform.cli", "resume", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = torch.load(run_dir / "final_params.pt", weights_only=True)
    reference = metaray.launch(metaray.load_config(cfg_path).replace(**{"run.run_dir": str(tmp_path / "ref")}), pool_factory=LocalPool)
    for k, v in reference.final_params.items():
        assert torch.equal(resumed[k], v), k


def test_demo_on_a_local_ray_cluster(tmp_path):
    """`metaray demo` (shortened): 2 Ray actors (WorkerPool), prints the meta-test and baseline, writes plots."""
    try:
        out = subprocess.run(
            [PY, "-m", "metaray.platform.cli", "demo", "--steps", "20", "--set", "tasks.test_tasks=50", "--set", "tasks.val_tasks=10",
             "--set", f"run.output_dir={json.dumps(str(tmp_path))}", "--set", "run.progress=false"],
            cwd=ROOT, capture_output=True, text=True, timeout=240,
        )
    except subprocess.TimeoutExpired as e:  # say where it stood (this took ~13 s on an idle machine)
        pytest.fail(f"demo did not finish in 240 s; stdout: {str(e.stdout)[-1500:]} stderr: {str(e.stderr)[-3000:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 Ray actors" in out.stdout and "(95% CI, 50 tasks)" in out.stdout and "baseline" in out.stdout
    (run_dir,) = tmp_path.iterdir()
    table = metaray.RunResult(run_dir, {}).table
    assert table.num_rows == 20
    assert table.column("worker0_tasks").to_pylist()[0] + table.column("worker1_tasks").to_pylist()[0] == 8
    assert (run_dir / "plots" / "learning_curves.png").stat().st_size > 1000


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.mark.slow
def test_submit_right_after_ray_start_waits_for_the_job_agent_and_says_where_results_are(tmp_path):
    """As a user would: `ray start --head`, then at once `metaray submit` (no waiting of our own: the dashboard
    and its job agent come up seconds later on a loaded machine, and submit must wait for them)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    ray_exe = str(Path(PY).parent / "ray")
    # Free ports for everything the head listens on: a job agent whose default port (52365) is taken by another
    # Ray on this machine never comes up, and submit then waits for it in vain (seen with two test runs at once).
    port, dash, agent, agent_grpc, env_agent = _free_ports(5)
    head = subprocess.Popen([ray_exe, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=3",
                             "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}",
                             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        work = tmp_path / "job"
        work.mkdir()
        results = tmp_path / "results"
        (work / "cfg.toml").write_text(CONFIG.replace("STEPS", "3").replace('backend = "inprocess"', 'backend = "ray"').replace("num_workers = 2", "num_workers = 1"))
        out = subprocess.run([PY, "-m", "metaray.platform.cli", "submit", "cfg.toml", "--address", f"http://127.0.0.1:{dash}",
                              "--working-dir", str(work), "--python", PY, "--output-dir", str(results), "--agent-timeout", "300",
                              "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}})],
                             cwd=work, env=env, capture_output=True, text=True, timeout=900)
        text = out.stdout + out.stderr
        assert out.returncode == 0, text[-3000:]
        assert "succeeded" in text.lower() and "meta-test" in out.stdout
        (run_dir,) = results.iterdir()  # the absolute --output-dir, not the job's temporary working dir
        assert f"results: {run_dir}" in out.stdout, out.stdout[-2000:]
        assert f"metaray: run directory {run_dir}" in out.stdout  # the job's own log line, streamed back
        assert metaray.RunResult(run_dir, {}).table.num_rows == 3
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
