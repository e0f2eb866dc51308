"""Speed against peer libraries on identical workloads: ratios of medians, timed alternately in one run.

    .venv/bin/python benchmarks/peers.py [--quick] [--json OUT.json] [--img-dir docs/img]

The peers live in their own environment (.venv-bench, made by tools/setup_bench_env.sh: boat-torch pins
numpy<=1.26.4, which breaks pyarrow and Ray in metaray's .venv). This script, run from .venv, is the
orchestrator: it starts ``peers.py --side metaray`` (in .venv) and ``peers.py --side peers`` (in .venv-bench)
alternately, ``rounds`` times; each side process builds the same model from the same seed, the same data
from the same generator, warms up, then times its implementations alternately ``repeats`` times and saves
its meta-gradients. The page reports median times, the ratio peer median / metaray median (> 1: metaray
faster) and how far each peer's meta-gradient is from metaray's (global relative norm), which shows the
workloads are the same computation.

Workloads (CPU; maml with ``--threads`` torch threads, the millisecond-sized others with 1 thread, because
small ops with 2 threads on a busy 2-core machine spend their time spin-waiting, see NOTES.md):
- maml: second-order MAML meta-gradient, Conv4 (32 channels, BatchNorm without running stats), 5-way
  1-shot, 15 queries per class, 28×28 inputs, 5 inner steps of 0.4, mean over the tasks of a meta-batch.
  metaray ``maml`` vs learn2learn ``MAML``, higher ``innerloop_ctx``, TorchOpt ``MetaSGD``. metaray's row is
  its fastest mode here, the tasks spread over ``--threads`` task threads of one intra-op thread each
  (``[cluster] task_threads``); "metaray task loop" is the plain loop with the peers' intra-op threads.
- imaml: iMAML implicit meta-gradient, MLP 64-64-64-5 on 5-way 5-shot (15 queries) Gaussian clusters
  (inputs of norm ~1), 10 inner steps of 0.1 on CE + λ/2‖φ − θ‖² (λ = 1), 5 plain CG steps (metaray
  ``on_indefinite="continue"``, as TorchOpt's CG). metaray ``imaml`` vs TorchOpt's
  ``diff.implicit.custom_root`` with ``linear_solve.solve_cg``.
- bda: BDA hypergradient on the non-unique toy (survey 001 §7), n = 100, x = ½, 50 aggregated inner steps
  (geometric ρ_t = 0.5·0.9^(t−1), step 0.5), metaray ``bda`` vs BOAT's GDA + NGD dynamics with RAD (its BDA
  configuration; the same computation, so the gradients agree to rounding).
- bvfim: BVFIM on the same toy, 50 value-function steps and 50 barrier steps of 0.1, all regularization
  weights 0.1, metaray ``bvfim`` vs BOAT's VSO. The two differ in details (BOAT warm-starts z across calls and
  puts the value function inside its log), so here the gradients differ and the error of each against the
  optimistic gradient ∇φ = x − 1 is shown too. Note the toy's lower-level values are negative.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as Fn

ROOT = Path(__file__).resolve().parents[1]
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"


def _models():
    """metaray/tasks/models.py loaded by path: the peer env has torch but not metaray's dependencies, and both
    sides must build the very same modules."""
    spec = importlib.util.spec_from_file_location("metaray_models", ROOT / "metaray" / "tasks" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- workloads: identical data and models on both sides --------------------------------------------------


def maml_setup(n_tasks: int):
    torch.manual_seed(0)
    model = _models().Conv4(ways=5, hidden=32)
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(n_tasks):
        xs, xq = torch.randn(5, 1, 28, 28, generator=g), torch.randn(75, 1, 28, 28, generator=g)
        tasks.append((xs, torch.arange(5), xq, torch.arange(5).repeat_interleave(15)))
    return model, tasks


def imaml_setup(n_tasks: int):
    torch.manual_seed(0)
    model = _models().mlp([64, 64, 64, 5])
    g = torch.Generator().manual_seed(1)
    tasks = []
    for _ in range(n_tasks):  # inputs of norm ~1-2, so H + λI is well conditioned and 5 CG steps nearly solve it
        centers = torch.randn(5, 64, generator=g) / 8
        ys, yq = torch.arange(5).repeat_interleave(5), torch.arange(5).repeat_interleave(15)
        tasks.append((centers[ys] + torch.randn(25, 64, generator=g) / 16, ys, centers[yq] + torch.randn(75, 64, generator=g) / 16, yq))
    return model, tasks


MAML = dict(steps=5, lr=0.4)
IMAML = dict(steps=10, lr=0.1, lam=1.0, cg=5)
BVFIM = dict(steps=50, lr=0.1, reg=0.1)  # K = T = 50 steps of 0.1; μ₁ = μ₂ = θ = τ = 0.1 (BOAT: ll_l2_reg, ul_l2_reg, ul_ln_reg)
BDA = dict(n=100, steps=50, inner_lr=0.5, upper_lr=0.5, rho0=0.5)  # geometric ρ_t = 0.5·0.9^(t−1)


# ---- metaray side ------------------------------------------------------------------------------------------


def metaray_impls(workload: str, n_tasks: int):
    import metaray.solvers as S
    from metaray.tasks import Episode, ModelProblem

    if workload == "bda":
        from metaray.tasks import NonUniqueToyProblem

        P = NonUniqueToyProblem(BDA["n"])
        x = {"x": torch.full((BDA["n"],), 0.5, dtype=torch.float64)}
        solver = S.make("bda", inner_steps=BDA["steps"], inner_lr=BDA["inner_lr"], upper_lr=BDA["upper_lr"], rho0=BDA["rho0"],
                        rho_schedule="geometric", rho_decay=0.9)
        return {"metaray": lambda: [solver.hypergrad(P, x, None).grad["x"]]}
    if workload == "bvfim":
        from metaray.tasks import NonUniqueToyProblem

        P = NonUniqueToyProblem(BDA["n"])
        x = {"x": torch.full((BDA["n"],), 0.5, dtype=torch.float64)}
        solver = S.make("bvfim", inner_steps=BVFIM["steps"], barrier_steps=BVFIM["steps"], inner_lr=BVFIM["lr"],
                        barrier_lr=BVFIM["lr"], mu1=BVFIM["reg"], mu2=BVFIM["reg"], theta=BVFIM["reg"], tau=BVFIM["reg"])
        return {"metaray": lambda: [solver.hypergrad(P, x, None).grad["x"]]}
    model, raw = (maml_setup if workload == "maml" else imaml_setup)(n_tasks)
    problem = ModelProblem(model, "cross_entropy")
    x = problem.initial_params()
    tasks = [Episode(*t) for t in raw]
    if workload == "maml":
        solver = S.make("maml", inner_steps=MAML["steps"], inner_lr=MAML["lr"])
    else:
        solver = S.make("imaml", inner_steps=IMAML["steps"], inner_lr=IMAML["lr"], lam=IMAML["lam"], cg_steps=IMAML["cg"], cg_tol=0.0,
                        on_indefinite="continue")  # plain CG, like TorchOpt's (the page reports how well it converged)

    def step():
        hgs = solver.hypergrad_batch(problem, x, tasks)
        return [sum(h.grad[k] for h in hgs) / len(hgs) for k in x]

    if workload != "maml":
        return {"metaray": step}

    # conv4 on a CPU: metaray's fastest mode is the task loop on task threads, one intra-op thread each
    # (solvers/threads.py; [cluster] task_threads), as many as the torch threads the peers get: it is "metaray".
    # The plain loop (all threads intra-op, as the peers run) and the vmapped modes are timed alongside (rows
    # "metaray ...", never counted as peers).
    from metaray.solvers.threads import TaskThreads

    threads = TaskThreads(problem, threads=torch.get_num_threads(), intra_op=1)

    def mean_of(hgs):
        return [sum(h.grad[k] for h in hgs) / len(hgs) for k in x]

    def loop():
        return mean_of([solver.hypergrad(problem, x, t) for t in tasks])

    def mean():
        g = solver.hypergrad_mean(problem, x, tasks).grad
        return [g[k] for k in x]

    return {"metaray": lambda: mean_of(threads.hypergrads(solver, x, tasks)), "metaray task loop": loop,
            "metaray batched (vmap, per task)": step, "metaray batched (vmap, mean form)": mean}


# ---- peer side ---------------------------------------------------------------------------------------------


def peer_impls(workload: str, n_tasks: int):
    impls = {}
    if workload == "maml":
        model, tasks = maml_setup(n_tasks)
        n, steps, lr = len(tasks), MAML["steps"], MAML["lr"]
        try:
            import learn2learn as l2l

            m_l2l = l2l.algorithms.MAML(copy.deepcopy(model), lr=lr, first_order=False)

            def l2l_step():
                m_l2l.zero_grad()
                for xs, ys, xq, yq in tasks:
                    learner = m_l2l.clone()
                    for _ in range(steps):
                        learner.adapt(Fn.cross_entropy(learner(xs), ys))
                    (Fn.cross_entropy(learner(xq), yq) / n).backward()
                return [p.grad.clone() for p in m_l2l.module.parameters()]

            impls["learn2learn"] = l2l_step
        except ImportError as e:
            impls["learn2learn"] = f"not run: {e}"
        try:
            import higher

            m_h = copy.deepcopy(model)
            opt = torch.optim.SGD(m_h.parameters(), lr=lr)

            def higher_step():
                m_h.zero_grad()
                for xs, ys, xq, yq in tasks:
                    with higher.innerloop_ctx(m_h, opt, copy_initial_weights=False) as (fm, diffopt):
                        for _ in range(steps):
                            diffopt.step(Fn.cross_entropy(fm(xs), ys))
                        (Fn.cross_entropy(fm(xq), yq) / n).backward()
                return [p.grad.clone() for p in m_h.parameters()]

            impls["higher"] = higher_step
        except ImportError as e:
            impls["higher"] = f"not run: {e}"
        try:
            import torchopt

            m_t = copy.deepcopy(model)
            inner = torchopt.MetaSGD(m_t, lr=lr)
            net_state = torchopt.extract_state_dict(m_t, by="reference", detach_buffers=True)
            opt_state = torchopt.extract_state_dict(inner, by="reference")

            def torchopt_step():
                m_t.zero_grad()
                for xs, ys, xq, yq in tasks:
                    for _ in range(steps):
                        inner.step(Fn.cross_entropy(m_t(xs), ys))
                    (Fn.cross_entropy(m_t(xq), yq) / n).backward()
                    torchopt.recover_state_dict(m_t, net_state)
                    torchopt.recover_state_dict(inner, opt_state)
                return [p.grad.clone() for p in m_t.parameters()]

            impls["torchopt"] = torchopt_step
        except ImportError as e:
            impls["torchopt"] = f"not run: {e}"
    elif workload == "imaml":
        try:
            import torchopt
        except ImportError as e:
            return {"torchopt (implicit)": f"not run: {e}"}
        model, tasks = imaml_setup(n_tasks)
        names = [k for k, _ in model.named_parameters()]
        meta = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
        lam, steps, lr = IMAML["lam"], IMAML["steps"], IMAML["lr"]

        def inner_loss(params, meta_params, xs, ys):
            out = torch.func.functional_call(model, dict(zip(names, params)), (xs,))
            prox = sum(((p - m) ** 2).sum() for p, m in zip(params, meta_params))
            return Fn.cross_entropy(out, ys) + 0.5 * lam * prox

        def optimality(params, meta_params, xs, ys):  # ∇_φ of the proximal inner loss, = 0 at the solution
            return torch.func.grad(inner_loss)(params, meta_params, xs, ys)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=torchopt.linear_solve.solve_cg(maxiter=IMAML["cg"], rtol=0.0, atol=0.0))
        def solve(params, meta_params, xs, ys):
            p = tuple(t.detach().clone() for t in params)
            m = tuple(t.detach() for t in meta_params)
            for _ in range(steps):
                with torch.enable_grad():
                    q = tuple(t.requires_grad_() for t in p)
                    g = torch.autograd.grad(inner_loss(q, m, xs, ys), q)
                p = tuple((a - lr * b).detach() for a, b in zip(q, g))
            return p

        def torchopt_imaml():
            for t in meta:
                t.grad = None
            for xs, ys, xq, yq in tasks:
                params = solve(meta, meta, xs, ys)
                out = torch.func.functional_call(model, dict(zip(names, params)), (xq,))
                (Fn.cross_entropy(out, yq) / len(tasks)).backward()
            return [t.grad.clone() for t in meta]

        impls["torchopt (implicit)"] = torchopt_imaml
    elif workload == "bda":
        impls["BOAT (GDA+NGD, RAD)"] = boat_bda_impl()
    elif workload == "bvfim":
        impls["BOAT (VSO)"] = boat_vso_impl()
    return impls


# BOAT's losses are looked up by dotted path ("peers.boat_ll"), called as loss(feed, ul_model, ll_model[, params]).
# GDA's aggregated loss ρ F + (1 − ρ) f stepped by SGD(s) is metaray bda's step with s_u = s_l = s, and its
# α ← α·decay after every step is bda's geometric schedule ρ_t = ρ₀ γ^(t−1).


class _Upper(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.x = torch.nn.Parameter(torch.full((n,), 0.5, dtype=torch.float64))


class _Lower(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.y1 = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.y2 = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

    def forward(self):
        return self.y1, self.y2


def _ys(ll_model, params=None):
    return ll_model(params=params) if params is not None else ll_model()


def boat_ll(feed, ul_model, ll_model, params=None):
    y1, _ = _ys(ll_model, params)
    return 0.5 * (y1**2).sum() - (ul_model.x * y1).sum()


def boat_ul(feed, ul_model, ll_model, params=None):
    y1, y2 = _ys(ll_model, params)
    return 0.5 * ((ul_model.x - y2) ** 2).sum() + 0.5 * ((y1 - 1.0) ** 2).sum()


def boat_gda(ll_feed, ul_feed, ul_model, ll_model, params=None):
    a = ll_feed["alpha"]
    return a * boat_ul(ul_feed, ul_model, ll_model, params) + (1 - a) * boat_ll(ll_feed, ul_model, ll_model, params)


def boat_bda_impl():
    try:
        import boat_torch
    except ImportError as e:
        return f"not run: {e}"
    sys.path.insert(0, str(Path(__file__).parent))  # so BOAT can import this module's losses as "peers.*"
    n, s = BDA["n"], BDA["inner_lr"]
    ul, ll = _Upper(n), _Lower(n)
    log = tempfile.NamedTemporaryFile(prefix="boat-loss-", suffix=".json", delete=False).name
    config = dict(
        fo_op=None, gm_op=["GDA", "NGD"], na_op=["RAD"], lower_level_model=ll, upper_level_model=ul,
        lower_level_var=list(ll.parameters()), upper_level_var=list(ul.parameters()),
        lower_level_opt=torch.optim.SGD(ll.parameters(), lr=s), upper_level_opt=torch.optim.SGD(ul.parameters(), lr=0.1),
        lower_iters=BDA["steps"], device="cpu", loss_log_path=log, GDA={"alpha_init": BDA["rho0"], "alpha_decay": 0.9},
        RGT={"truncate_iter": 0}, DI={"lr": 0.1}, accumulate_grad=False, return_grad=True, copy_last_param=False,
        fo_ol_batch_input=False,
    )
    losses = {"lower_level_loss": {"function": "peers.boat_ll"}, "upper_level_loss": {"function": "peers.boat_ul"},
              "gda_loss": {"function": "peers.boat_gda"}}
    problem = boat_torch.Problem(config, losses)
    problem.build_ll_solver()
    problem.build_ul_solver()
    it = [0]

    def step():
        ul.x.grad = None
        grads, _ = problem.run_iter({}, {}, current_iter=it[0])
        it[0] += 1
        return [g.detach().clone() for g in grads]

    return step


def boat_vso_impl():
    """BOAT's BVFIM ("VSO"): same problem and step counts as metaray's bvfim; the algorithms differ in details
    (BOAT takes log(ψ + f(y).item() − f(y)) with ψ the regularized value, warm-starts z across calls), so the
    gradients are not expected to agree; the table shows the error of each against ∇φ instead."""
    try:
        import boat_torch
    except ImportError as e:
        return f"not run: {e}"
    sys.path.insert(0, str(Path(__file__).parent))
    n = BDA["n"]
    ul, ll = _Upper(n), _Lower(n)
    log = tempfile.NamedTemporaryFile(prefix="boat-loss-", suffix=".json", delete=False).name
    r = BVFIM["reg"]
    config = dict(
        fo_op="VSO", gm_op=None, na_op=None, lower_level_model=ll, upper_level_model=ul,
        lower_level_var=list(ll.parameters()), upper_level_var=list(ul.parameters()),
        lower_level_opt=torch.optim.SGD(ll.parameters(), lr=BVFIM["lr"]), upper_level_opt=torch.optim.SGD(ul.parameters(), lr=0.1),
        lower_iters=BVFIM["steps"], device="cpu", loss_log_path=log,
        VSO={"z_loop": BVFIM["steps"], "ll_l2_reg": r, "ul_l2_reg": r, "ul_ln_reg": r, "reg_decay": 0.0, "z_lr": BVFIM["lr"]},
        GDA={"alpha_init": 0.0, "alpha_decay": 1.0}, RGT={"truncate_iter": 0}, accumulate_grad=False, return_grad=True,
        copy_last_param=False, fo_ol_batch_input=False,
    )
    losses = {"lower_level_loss": {"function": "peers.boat_ll"}, "upper_level_loss": {"function": "peers.boat_ul"}}
    problem = boat_torch.Problem(config, losses)
    problem.build_ll_solver()
    problem.build_ul_solver()

    def step():
        ul.x.grad = None
        grads, _ = problem.run_iter({}, {}, current_iter=0)
        return [g.detach().clone() for g in grads]

    return step


# ---- one side: time alternately, save gradients ------------------------------------------------------------


def run_side(side: str, workload: str, n_tasks: int, repeats: int, grads_out: str) -> dict:
    impls = metaray_impls(workload, n_tasks) if side == "metaray" else peer_impls(workload, n_tasks)
    live = {k: f for k, f in impls.items() if callable(f)}
    out = {"times": {k: [] for k in live}, "skipped": {k: v for k, v in impls.items() if not callable(v)}}
    grads = {}
    for k, f in live.items():  # warm-up (lazy inits, allocator) and the gradient to compare
        try:
            grads[k] = [g.detach().double() for g in f()]
        except Exception as e:  # noqa: BLE001 — a peer that crashes is reported, not hidden
            out["skipped"][k] = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    live = {k: f for k, f in live.items() if k in grads}
    out["times"] = {k: [] for k in live}
    for _ in range(repeats):
        for k, f in live.items():
            t = time.perf_counter()
            f()
            out["times"][k].append(time.perf_counter() - t)
    torch.save(grads, grads_out)
    return out


# ---- orchestrator -------------------------------------------------------------------------------------------


def rel(g, ref) -> float:
    num = sum(float((a - b).pow(2).sum()) for a, b in zip(g, ref))
    den = sum(float(b.pow(2).sum()) for b in ref)
    return (num / max(den, 1e-300)) ** 0.5


def verdict(ratio: float) -> str:
    """Words for a peer/metaray time ratio; within ±3 % is parity (below this machine's run-to-run noise)."""
    return "parity" if abs(ratio - 1) < 0.03 else ("metaray faster" if ratio > 1 else "metaray slower")


def orchestrate(quick: bool, threads: int, img_dir: Path, only: list[str] | None = None) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from common import plt, table  # matplotlib only in the orchestrator

    # workload: (tasks per meta-batch, repeats per side process); the millisecond workloads get more repeats
    workloads = ({"maml": (2, 2), "imaml": (2, 5), "bda": (1, 5), "bvfim": (1, 5)} if quick else
                 {"maml": (8, 5), "imaml": (8, 20), "bda": (1, 20), "bvfim": (1, 10)})
    if only:
        workloads = {k: v for k, v in workloads.items() if k in only}
    rounds = 1 if quick else 3
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bench_ok = BENCH_PY.exists()
    results, notes, t0 = {}, [], time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="metaray-peers-"))
    for wl, (n_tasks, repeats) in workloads.items():
        times: dict[str, list] = {}
        skipped: dict[str, str] = {}
        grads = {}
        sides = [("metaray", sys.executable)] + ([("peers", str(BENCH_PY))] if bench_ok else [])
        for r in range(rounds):
            for side, py in (sides if r % 2 == 0 else sides[::-1]):  # alternate which side goes first
                gpath = tmp / f"{wl}-{side}.pt"
                cmd = [py, __file__, "--side", side, "--workload", wl, "--tasks", str(n_tasks), "--repeats", str(repeats),
                       "--threads", str(threads if wl == "maml" else 1), "--grads", str(gpath)]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
                except subprocess.TimeoutExpired:
                    skipped[side] = "not run: side process timed out after 300 s"
                    continue
                if p.returncode != 0:
                    skipped[side] = f"not run: {side} side failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}"
                    continue
                res = json.loads(p.stdout.strip().splitlines()[-1])
                for k, v in res["times"].items():
                    times.setdefault(k, []).extend(v)
                skipped.update(res["skipped"])
                grads.update(torch.load(gpath))
        if not bench_ok:
            skipped["peers"] = "not run: .venv-bench missing (run tools/setup_bench_env.sh)"
        results[wl] = {"tasks": n_tasks, "repeats": repeats, "times": times, "skipped": skipped,
                       "agreement": {k: rel(g, grads["metaray"]) for k, g in grads.items() if k != "metaray" and "metaray" in grads}}
        if wl in ("bda", "bvfim"):  # toy workloads: also the error against the optimistic gradient ∇φ(½) = ½ − 1
            ref = [torch.full((BDA["n"],), -0.5, dtype=torch.float64)]
            results[wl]["vs_reference"] = {k: rel(g, ref) for k, g in grads.items()}
    # ---- tables
    tables, headline = [], []
    labels = {"maml": "second-order MAML meta-step", "imaml": "iMAML meta-step", "bda": "BDA hypergradient",
              "bvfim": "BVFIM hypergradient"}
    for wl, r in results.items():
        med = {k: statistics.median(v) for k, v in r["times"].items() if v}
        rows = []
        m0 = med.get("metaray")
        for k, v in med.items():
            ratio = v / m0 if (m0 and k != "metaray") else None
            row = [k, v * 1e3, len(r["times"][k]), ratio if ratio else "–", r["agreement"].get(k, "–")]
            rows.append(row + ([r["vs_reference"].get(k, "–")] if "vs_reference" in r else []))
        cols = ["implementation", "median ms", "n", "peer time / metaray time", "grad rel. diff vs metaray"]
        if "vs_reference" in r:
            cols.append("rel. error vs ∇φ (optimistic)")
        for k, why in r["skipped"].items():
            rows.append([k, why] + [""] * (len(cols) - 2))
        tables.append(table(f"{labels[wl]} ({r['tasks']} task(s)): median ms over {rounds} alternating round(s) × {r['repeats']} repeats",
                            cols, rows))
        peers = {k: v for k, v in med.items() if not k.startswith("metaray")}
        if m0 and peers:
            fastest = min(peers, key=peers.get)
            ratio = peers[fastest] / m0
            line = f"{labels[wl]}, CPU: fastest peer {fastest} time / metaray time = **{ratio:.2f}×** ({verdict(ratio)}"
            if wl == "maml":
                line += (f"; metaray on task threads; target ≥ 1.0×: {'met' if ratio >= 1.0 else 'missed'}, "
                         f"moonshot 1.2×: {'met' if ratio >= 1.2 else 'missed'}")
            headline.append(line + ").")
        elif not peers:
            headline.append(f"{labels[wl]}: no peer ran ({'; '.join(sorted(set(r['skipped'].values())))[:200]}).")
    bars = [(f"{wl}: {k}", statistics.median(v) / statistics.median(r["times"]["metaray"]))
            for wl, r in results.items() if r["times"].get("metaray") for k, v in r["times"].items() if k != "metaray" and v]
    plots = []
    if bars:
        fig, ax = plt.subplots(figsize=(6.0, 0.45 * len(bars) + 1.2), dpi=100)
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color=["tab:green" if b[1] >= 1 else "tab:red" for b in bars])
        ax.axvline(1.0, color="k", lw=1)
        ax.axvline(1.2, color="gray", ls="--", lw=1, label="MAML target 1.2×")
        ax.set_xlabel("peer time / metaray time (median; > 1: metaray faster)")
        ax.set_title("Speed against peers, CPU", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        img_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(img_dir / "peers_ratios.png")
        plt.close(fig)
        plots.append({"file": "peers_ratios.png", "caption": "Time ratios against peers"})
    return {
        "title": "Speed against peers",
        "intro": (__doc__.split("\n\n", 2)[2].strip() + f"\n\nThreads for maml: {threads}. This section took "
                  f"{time.perf_counter() - t0:.0f} s."),
        "tables": tables, "plots": plots, "notes": notes, "headline": headline, "data": results,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["metaray", "peers"], default=None, help="internal: run one side")
    ap.add_argument("--workload", choices=["maml", "imaml", "bda", "bvfim"], default="maml")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--grads", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--img-dir", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated workloads (default: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(run_side(args.side, args.workload, args.tasks, args.repeats, args.grads)))
        return
    section = orchestrate(args.quick, args.threads, Path(args.img_dir), args.only.split(",") if args.only else None)
    from common import write_section

    write_section(args.json, section)


if __name__ == "__main__":
    main()
