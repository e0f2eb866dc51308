"""Keeps the benchmark suite alive in CI: the accuracy benchmark at its smallest size, checked against numbers
that could be wrong (rad's hypergradient equals the exact derivative of the T-step unroll; errors fall with T;
BDA reaches the optimistic gradient where rad stalls), and the page renderer with a section that did not run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import accuracy  # noqa: E402
import run_all  # noqa: E402


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    img = tmp_path_factory.mktemp("img")
    return accuracy.build(quick=True, img_dir=img), img


def test_accuracy_numbers_are_exact_where_they_must_be(section):
    sec, _ = section
    q = sec["data"]["quadratic"]
    assert max(q["unroll_exact"]) < 1e-12  # rad and maml vs the closed-form T-step derivative
    rad = q["curves"]["rad"]
    assert rad[-1] < 1e-3 < rad[0]  # converges to the implicit hypergradient as T grows (T = 1 … 100)
    assert q["k_curves"]["ift-cg"][-1] < 1e-8  # 8 CG steps on an 8-dim SPD system are exact
    assert q["fsla"][-1] < 1e-2 < q["fsla"][0]
    assert not q["notes"], q["notes"]
    bda = sec["data"]["bda_toy"]["curves"]
    assert bda["rad (s=0.5)"][-1] > 0.99 and min(bda["bda (ρ₀=0.9, s_l=0.5, s_u=1)"]) < 0.1  # rad stalls, BDA does not


def test_page_renders_sections_plots_and_not_run_reasons(section):
    sec, img = section
    json.dumps(sec, default=float)
    assert (img / "accuracy_quadratic_T.png").stat().st_size > 1000
    results = {"accuracy": {"section": sec, "kind": "json"},
               "peers": {"error": "not run: .venv-bench missing", "kind": "json"}}
    info = {"cpu": "test cpu", "cores": 2, "cuda": False}
    page = run_all.render(results, info, True, "now", 1.0, ("0", "0"), "img")
    assert "## Hypergradient accuracy" in page and "not run: .venv-bench missing" in page
    assert "not run: no GPU in this session" in page
    assert "](img/accuracy_quadratic_T.png)" in page


@pytest.mark.slow
def test_gpu_benchmark_cpu_smoke_mode_runs_end_to_end():
    """benchmarks/gpu.py --device cpu --quick: every mode ran, the batched gradients equal the loop's (float32),
    and the actors part reports a rate for 1 and 2 actors."""
    import gpu

    out = gpu.main(["--device", "cpu", "--quick", "--repeats", "1"])
    for name, wl in out["workloads"].items():
        assert not wl["skipped"], (name, wl["skipped"])
        for mode, row in wl["modes"].items():
            assert row["tasks_per_s"] > 0
            # bf16 is compared with fp32 (benchmarks/precision.py measures how far); the rest is the same fp32 math
            assert row["grad_rel_diff_vs_metaray_loop"] < (3.0 if "bf16" in mode else 1e-4), (name, mode, row)
    assert set(out["actors_sharing_the_device"]) == {"1", "2", "1, prefetch off"}
    assert all(isinstance(v, dict) and v["tasks_per_s"] > 0 for v in out["actors_sharing_the_device"].values())
    assert not out["actors_sharing_the_device"]["1"]["prefetch"]  # "auto" leaves CPU actors without it


@pytest.mark.slow
def test_scale_out_benchmark_runs_a_part_of_itself(tmp_path):
    """benchmarks/scale_out.py as a user runs a part of it (its own Ray cluster, so a subprocess): the 2 actors'
    outer gradient is the one-process bits, the driver receives one gradient (4d bytes) from them against
    8 x 4d in one process, and the row of two plain processes is timed."""
    import subprocess

    plain = "2 plain processes, compute only (no Ray, nothing moved)"
    out = tmp_path / "so.json"
    done = subprocess.run([sys.executable, str(BENCH / "scale_out.py"), "--sizes", "400", "--rounds", "1", "--only",
                           "2 actors, reduction=actors", plain, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sec = json.loads(out.read_text())
    rows = {r[1]: r for r in sec["tables"][0]["rows"]}
    assert set(rows) == {"one process", "2 actors, reduction=actors", plain} and not sec["notes"]
    assert rows["2 actors, reduction=actors"][-1] == "yes"
    d = 400 * 400 + 4 * 400 + 1  # MLP 1-400-400-1
    (data,) = sec["data"].values()
    assert data["bytes_to_driver"] == {"one process": 8 * 4 * d, "2 actors, reduction=actors": 4 * d}
    assert len(data["seconds"][plain]) == 1 and data["seconds"][plain][0] > 0


def test_exact_sum_benchmark_compares_the_same_bits(tmp_path):
    """benchmarks/exact_sum.py --quick: both exact encoders (tasks at once, one at a time) give the same bits at
    d = 1M for 4 and 8 tasks, and every mode is timed."""
    import exact_sum

    sec = exact_sum.build(quick=True, img_dir=tmp_path)
    assert not sec["notes"], sec["notes"]
    assert set(sec["data"]) == {"1000000/4", "1000000/8"}
    assert all(v["bit_identical"] for v in sec["data"].values())
    assert all(t > 0 for v in sec["data"].values() for ts in v["seconds"].values() for t in ts)
