"""Runs every benchmark once and writes docs/benchmarks.md (tables, PNG plots in docs/img, the machine).

    .venv/bin/python benchmarks/run_all.py            # full pass (≤ ~25 min on an idle 2-core machine)
    .venv/bin/python benchmarks/run_all.py --quick    # small sizes (≤ ~3 min): checks the page builds
    .venv/bin/python benchmarks/run_all.py --only accuracy,peers

Each benchmark runs as its own subprocess with a time limit. JSON benchmarks (see benchmarks/common.py) give
tables and plots; the reused scripts (maml_step.py, sgld_1d.py, cluster_scaling.py) are included by their
output. A benchmark that is missing, fails or times out gets "not run: <reason>" in its section — never
numbers from anywhere else. Raw outputs go to docs/benchmarks_raw/ so every number can be traced.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PY = sys.executable
PLOT_PREFIXES = ("accuracy_", "paper004_", "peers_", "memory_", "fewshot_", "cluster_")  # the PNGs benchmarks write


@dataclass
class Bench:
    key: str
    title: str
    script: str
    kind: str  # "json": our section protocol; "text": stdout included as is; "markdown": stdout is markdown
    full_args: list[str] = field(default_factory=list)
    quick_args: list[str] = field(default_factory=list)
    timeout_full: int = 300
    timeout_quick: int = 60
    json_args: bool = True  # pass --json/--img-dir/--quick


BENCHES = [
    Bench("accuracy", "Hypergradient accuracy", "accuracy.py", "json", timeout_full=180, timeout_quick=45),
    Bench("paper003", "Paper 003 (HPO-SGLD) Tables 2 and 3: synthetic 1D problem", "sgld_1d.py", "markdown",
          full_args=[], quick_args=["--quick"], timeout_full=330, timeout_quick=90, json_args=False),
    Bench("paper004", "Paper 004 (FSLA): hypergradient error and data hyper-cleaning", "paper004.py", "json",
          timeout_full=300, timeout_quick=45),
    Bench("maml_step", "MAML meta-step vs learn2learn, same process", "maml_step.py", "text",
          full_args=["--repeats", "7"], quick_args=["--repeats", "2", "--tasks", "2"], timeout_full=180, timeout_quick=60,
          json_args=False),
    Bench("peers", "Speed against peers on identical workloads", "peers.py", "json", timeout_full=420, timeout_quick=120),
    Bench("batched", "Batched task hypergradients vs the task loop", "batched.py", "json", timeout_full=240, timeout_quick=90),
    Bench("precision", "bf16 inner loop against fp32", "precision.py", "json", timeout_full=300, timeout_quick=90),
    Bench("prefetch", "Tasks loaded ahead: prefetch off and on", "prefetch.py", "json", timeout_full=300, timeout_quick=90),
    Bench("memory", "Memory vs horizon", "memory_horizon.py", "json", timeout_full=1200, timeout_quick=90),
    Bench("cluster", "Scaling on Ray", "cluster_scaling.py", "text", full_args=[],
          quick_args=["--steps", "2", "--tasks", "4", "--broadcast-mb", "20"],
          timeout_full=300, timeout_quick=90, json_args=False),
    Bench("scale_out", "Scale-out: where the task hypergradients are reduced", "scale_out.py", "json",
          timeout_full=1500, timeout_quick=150),
    Bench("exact_sum", "The exact sum's encoder: tasks at once vs one at a time", "exact_sum.py", "json",
          timeout_full=300, timeout_quick=60),
    Bench("distributed_peer", "Distributed MAML: metaray's actors vs torchopt.distributed", "distributed_peer.py", "json",
          timeout_full=600, timeout_quick=240),
    Bench("scale_sim", "Scale simulation: 4 Ray nodes, up to 16 actors", "scale_sim.py", "json",
          timeout_full=900, timeout_quick=240),
    Bench("fewshot", "Few-shot accuracy at a fixed compute budget", "fewshot_accuracy.py", "json",
          timeout_full=420, timeout_quick=60),
]

# Paper 003 (Kim & Hospedales), Tables 2 and 3, λ (|λ − λ*|): copied from the paper's text
# (shared/papers/003_*.txt; λ* = 0.7487 by its line search), each beside the sgld_1d.py row run at the same
# budget (100 inner iterations per outer step). (paper method, Table 2, Table 3, metaray row label)
PAPER003 = [
    ("HPO-SGLD τ = 1e-2", "0.7488 (0.0001), τ not stated", "0.7495 (0.0008)", "sgld η=0.01 τ=1e-2 warm"),
    ("HPO-SGLD τ = 1e-5", "", "0.7473 (0.0014)", "sgld η=0.01 τ=1e-5 warm"),
    ("HPO-SGLD τ = 1e-10", "", "0.7468 (0.0019)", "sgld η=0.01 τ=1e-10 warm"),
    ("IFT-Neumann", "0.7491 (0.0004)", "0.7640 (0.0153)", "ift-neumann (s = 0.1)"),
    ("IFT-CG", "0.7488 (0.0001)", "0.7544 (0.0057)", "ift-cg (s = 0.1)"),
    ("RMD (100 inner)", "0.7360 (0.0127)", "0.7363 (0.0124)", "rad (s = 0.01)"),
    ("RMD (100 inner)", "0.7360 (0.0127)", "0.7363 (0.0124)", "rad (s = 0.1)"),
    ("FMD (100 inner)", "0.7360 (0.0127)", "0.7364 (0.0123)", ""),
    ("RMD (1000 inner)", "0.7489 (0.0002)", "0.7517 (0.0030)", ""),
]


def md_rows(text: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the markdown table rows in text (cells may contain escaped pipes)."""
    rows = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("| ") and line.endswith(" |") and not line.startswith("|---"):
            cells = [c.strip() for c in line[2:-2].split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    probe = ("import json, torch, numpy\n"
             "d = {'torch': torch.__version__, 'numpy': numpy.__version__, 'cuda': torch.cuda.is_available(),"
             " 'threads': torch.get_num_threads()}\n"
             "d['gpu'] = torch.cuda.get_device_name(0) if d['cuda'] else None\n"
             "for m in ('ray', 'learn2learn', 'pyarrow'):\n"
             "    try:\n        d[m] = __import__(m).__version__\n"
             "    except Exception as e:\n        d[m] = 'not importable: ' + type(e).__name__\n"
             "print(json.dumps(d))")
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=120)
    info.update(json.loads(r.stdout) if r.returncode == 0 else {"torch": f"probe failed: {r.stderr[-200:]}"})
    bench_py = ROOT / ".venv-bench" / "bin" / "python"
    if bench_py.exists():
        r = subprocess.run([str(bench_py), "-c", "import torch, numpy, higher, torchopt, learn2learn, importlib.metadata as m;"
                            "print(torch.__version__, numpy.__version__, torchopt.__version__, m.version('higher'), "
                            "m.version('boat-torch'), learn2learn.__version__)"], capture_output=True, text=True, timeout=180)
        info["bench_env"] = (dict(zip(["torch", "numpy", "torchopt", "higher", "boat-torch", "learn2learn"], r.stdout.split()))
                             if r.returncode == 0 else f"broken: {r.stderr.strip().splitlines()[-1:]}")
    else:
        info["bench_env"] = "missing (.venv-bench: run tools/setup_bench_env.sh)"
    return info


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_bench(b: Bench, quick: bool, img_dir: Path, raw_dir: Path, time_left: float) -> dict:
    script = BENCH / b.script
    out = {"key": b.key, "title": b.title, "kind": b.kind}
    if not script.exists():
        out["error"] = f"not run: benchmarks/{b.script} does not exist in this checkout"
        return out
    if time_left < 15:
        out["error"] = "not run: the run's total time budget (--budget-min) was spent before this benchmark"
        return out
    args = b.quick_args if quick else b.full_args
    if "--quick" in args and "--quick" not in script.read_text():  # a reused script without a quick mode
        args = [a for a in args if a != "--quick"]
    cmd = [PY, str(script)] + args
    json_path = raw_dir / f"{b.key}.json"
    if b.json_args:
        cmd += ["--json", str(json_path), "--img-dir", str(img_dir)] + (["--quick"] if quick else [])
    timeout = int(min(b.timeout_quick if quick else b.timeout_full, time_left))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    t0 = time.perf_counter()
    print(f"[bench] {b.key}: {' '.join(cmd[1:])} (limit {timeout} s)", flush=True)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        stdout, stderr, rc = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, rc = f"timed out after {timeout} s", None
    out["seconds"] = time.perf_counter() - t0
    (raw_dir / f"{b.key}.stdout.txt").write_text(stdout + ("\n--- stderr ---\n" + stderr if stderr else ""))
    print(f"[bench] {b.key}: rc={rc} in {out['seconds']:.0f} s", flush=True)
    if rc != 0:
        last = [ln for ln in (stderr or "").strip().splitlines() if ln.strip()][-1:] or ["no output"]
        out["error"] = f"not run: {'timed out after ' + str(timeout) + ' s' if rc is None else 'exit code ' + str(rc)}: {last[0][:300]}"
        if stdout.strip():
            out["partial"] = stdout
        return out
    if b.kind == "json":
        try:
            out["section"] = json.loads(json_path.read_text())
        except (OSError, ValueError) as e:
            out["error"] = f"not run: no valid JSON from {b.script}: {e}"
    else:
        out["stdout"] = stdout
    return out


# ---- rendering -------------------------------------------------------------------------------------------


def md_table(t: dict) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    caption = t["caption"].replace("*", "\\*")  # λ*, θ* inside an italic caption would end the italics
    lines = [f"*{caption}*", "", "| " + " | ".join(esc(c) for c in t["columns"]) + " |",
             "|" + "---|" * len(t["columns"])]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in t["rows"]]
    return "\n".join(lines)


def render_json_section(sec: dict, img_rel: str) -> list[str]:
    out = []
    if sec.get("intro"):
        out += [sec["intro"], ""]
    for t in sec.get("tables", []):
        out += [md_table(t), ""]
    for p in sec.get("plots", []):
        out += [f"![{p['caption']}]({img_rel}/{p['file']})", ""]
    for n in sec.get("notes", []):
        out.append(f"- {n}")
    if sec.get("notes"):
        out.append("")
    return out


def render_paper003(res: dict) -> list[str]:
    out = ["Side by side: paper 003's numbers (copied from its Tables 2 and 3; λ* = 0.7487 by its line search) and "
           "metaray's from this run (`benchmarks/sgld_1d.py`: every method gets 100 inner iterations per outer step, sgld "
           "B = M = 50; λ* = 0.748936 by a finer line search; see docs/sgld.md for the parameterization of η and τ). "
           "λ final (|λ − λ*|, mean ± std over seeds).", ""]
    if "error" in res:
        return out + [res["error"], ""]
    rows = md_rows(res["stdout"])
    out += ["| paper 003 method | paper: Table 2 (clean) | paper: Table 3 (noisy) | metaray run | metaray: clean | "
            "metaray: noisy | metaray: noisy, \\|λ̄ − λ*\\| of the last quarter |", "|---|---|---|---|---|---|---|"]
    for method, t2, t3, label in PAPER003:
        ours = rows.get(label, ["–", "–", "–"]) if label else ["no counterpart in this run", "", ""]
        out.append(f"| {method} | {t2} | {t3} | {label or '–'} | " + " | ".join(ours[:3]) + " |")
    out += ["", "All metaray rows of this run:", "", res["stdout"].strip(), ""]
    return out


def maml_ratio(text: str) -> float | None:
    m = re.search(r"speed ratio \(learn2learn time / metaray time\): ([0-9.]+)", text)
    return float(m.group(1)) if m else None


def headline(results: dict[str, dict]) -> list[str]:
    out = []
    r = results.get("maml_step")
    if r and "stdout" in r:
        ratio = maml_ratio(r["stdout"])
        if ratio is not None:
            verdict = "meets" if ratio >= 1.2 else "misses"
            out.append(f"- Second-order MAML meta-step on the CPU, same process: learn2learn time / metaray time = "
                       f"**{ratio:.2f}×** ({verdict} the ≥ 1.2× target; "
                       f"{'parity' if abs(ratio - 1) < 0.03 else 'metaray faster' if ratio > 1 else 'metaray slower'}).")
    p = results.get("peers", {}).get("section")
    if p:
        out += [f"- {h}" for h in p.get("headline", [])]
    b = results.get("batched", {}).get("section")
    if b:
        out += [f"- {h}" for h in b.get("headline", [])]
    c = results.get("cluster")
    if c and "stdout" in c:
        m = re.search(r"speed-up 2 vs 1 actor: ([0-9.]+)x", c["stdout"])
        o = re.search(r"per-step overhead.*?\(([+-][0-9.]+%)", c["stdout"])
        if m or o:
            out.append("- Ray on this CPU: " + "; ".join(
                ([f"tasks/s with 2 actors vs 1: **{m.group(1)}×**"] if m else [])
                + ([f"per-step overhead vs in-process: **{o.group(1)}**"] if o else [])) + ".")
    out.append("- GPU targets (≥ 3× learn2learn with task batching; 1-8 fractional-GPU actors): not run: no GPU in this session.")
    return out


def render(results: dict[str, dict], info: dict, quick: bool, started: str, seconds: float, loads: tuple[str, str],
           img_rel: str) -> str:
    lines = ["# metaray benchmarks", "",
             f"Generated by `make bench` (`benchmarks/run_all.py{' --quick' if quick else ''}`) on {started} UTC in "
             f"{seconds / 60:.1f} min. Every number on this page comes from that one run; raw outputs are in "
             "[benchmarks_raw/](benchmarks_raw/).", ""]
    if quick:
        lines += ["**This is a `--quick` pass: tiny sizes, few repeats — for checking the page builds, not for "
                  "conclusions.**", ""]
    lines += ["## Machine", "",
              f"- CPU: {info.get('cpu')} — {info.get('cores')} logical cores, {info.get('memory_gb', '?')} GiB memory",
              f"- GPU: {info.get('gpu') or 'none'}",
              f"- Python {info.get('python')}, torch {info.get('torch')}, numpy {info.get('numpy')}, ray {info.get('ray')}, "
              f"pyarrow {info.get('pyarrow')}, learn2learn {info.get('learn2learn')}; {info.get('os')}",
              f"- Peer environment (.venv-bench): {info.get('bench_env')}",
              f"- Load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}. Timings are wall clock; on a "
              "shared machine they are inflated, which is why peers are timed alternately and compared by ratios of medians.",
              "", "## Headline", ""]
    lines += headline(results) + [""]
    for b in BENCHES:
        res = results.get(b.key)
        if res is None:
            continue
        lines += [f"## {b.title}", ""]
        if b.key == "paper003":
            lines += render_paper003(res)
            continue
        if "error" in res:
            lines += [res["error"], ""]
            if res.get("partial"):
                lines += ["Output before it stopped:", "", "```", res["partial"].strip()[-3000:], "```", ""]
            continue
        if b.kind == "json":
            lines += render_json_section(res["section"], img_rel)
        elif b.kind == "markdown":
            lines += [res["stdout"].strip(), ""]
        else:
            lines += [f"`benchmarks/{b.script}` output:", "", "```", res["stdout"].strip(), "```", ""]
        if b.key == "cluster" and not info.get("cuda"):
            lines += ["1-8 fractional-GPU actors: not run: no GPU in this session.", ""]
    lines += ["## GPU", "", "not run: no GPU in this session." if not info.get("cuda") else
              f"GPU present ({info.get('gpu')}); the sections above ran on the CPU unless they say otherwise.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, ≤ ~3 minutes")
    ap.add_argument("--only", default="", help="comma-separated keys: " + ",".join(b.key for b in BENCHES))
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--budget-min", type=float, default=None,
                    help="total wall-clock budget; a benchmark gets at most what is left (default 24, --quick 6)")
    args = ap.parse_args(argv)
    only = {k.strip() for k in args.only.split(",") if k.strip()}
    unknown = only - {b.key for b in BENCHES}
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; valid: {', '.join(b.key for b in BENCHES)}")
    out = Path(args.out)
    docs = out.parent
    img_dir, raw_dir = docs / "img", docs / "benchmarks_raw"
    # "from scratch": this run's outputs replace the previous run's (only the benchmark plots: docs/img is shared)
    for d in (img_dir, raw_dir):
        if d.exists() and not only:
            for f in d.iterdir():
                if f.is_file() and (d == raw_dir or (f.suffix == ".png" and f.name.startswith(PLOT_PREFIXES))):
                    f.unlink()
        d.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0, load0 = time.perf_counter(), loadavg()
    budget = 60 * (args.budget_min if args.budget_min is not None else (6 if args.quick else 24))
    info = machine()
    (raw_dir / "machine.json").write_text(json.dumps(info, indent=1))
    results = {}
    for b in BENCHES:
        if only and b.key not in only:
            continue
        time_left = budget - (time.perf_counter() - t0)
        results[b.key] = run_bench(b, args.quick, img_dir, raw_dir, time_left)
    seconds = time.perf_counter() - t0
    text = render(results, info, args.quick, started, seconds, (load0, loadavg()), os.path.relpath(img_dir, docs))
    out.write_text(text)
    failed = [k for k, r in results.items() if "error" in r]
    print(f"[bench] wrote {out} in {seconds / 60:.1f} min; sections not run: {failed or 'none'}")


if __name__ == "__main__":
    main()
