"""Every example config runs for a couple of outer steps (in-process pool, few tasks)."""
from pathlib import Path

import pytest
from platform_pools import LocalPool

import metaray
from metaray.tasks import registry

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))
# Conv4 examples cost ~10 s each here; one stays in the default selection, the others run with -m slow.
SLOW = {"glyphs_fomaml", "glyphs_reptile", "glyphs_imaml", "glyphs_ridge", "omniglot_maml"}
PARAMS = [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else []) for p in EXAMPLES]


@pytest.fixture(scope="module")
def small_glyphs():
    from metaray.tasks.glyphs import glyphs_path, load_glyphs

    load_glyphs(classes=100, samples=20, seed=0)
    return glyphs_path(100, 20, 0)


@pytest.mark.parametrize("path", PARAMS)
def test_example_config_runs_two_steps(path, tmp_path, small_glyphs):
    cfg = metaray.load_config(path)
    persistent = cfg.tasks.persistent
    overrides = {
        "run.steps": 2, "run.run_dir": str(tmp_path / "run"), "run.progress": False, "run.plots": False,
        "run.val_every": 1, "run.checkpoint_every": 1, "tasks.meta_batch_size": min(cfg.tasks.meta_batch_size, 2),
        "tasks.val_tasks": 1 if persistent else 2, "tasks.test_tasks": 1 if persistent else 2,
        "cluster.backend": "inprocess",
    }
    options = registry.problem_options(cfg.problem.name)
    if "classes" in options:
        overrides["problem.classes"] = 100  # the small glyph set (the examples use the full 1600 classes)
    if cfg.problem.options.get("dataset", "glyphs") != "glyphs":  # omniglot: a local Parquet copy in the same format
        overrides["problem.dataset"] = str(small_glyphs)
    defaults = {o["name"]: o["default"] for o in metaray.solvers.get(cfg.solver.name).Options.describe()}
    for key, small in (("inner_steps", 2), ("samples", 2), ("cg_steps", 2)):
        if isinstance(defaults.get(key), int) and cfg.solver.options.get(key, defaults[key]) > small:
            overrides[f"solver.{key}"] = small
    result = metaray.launch(cfg.replace(**overrides), pool_factory=LocalPool)
    assert result.table.num_rows == 2 and result.test is not None


def test_learned_optimizer_example_trains_a_module_outside_metaray(tmp_path):
    """examples/learned_optimizer.py: meta-trains an LSTM optimizer (50 outer steps here), saves it, then the file
    loaded as a torch.optim.Optimizer trains an ordinary nn.Module on a held-out problem."""
    import subprocess
    import sys

    import torch

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "lstm.pt"
    r = subprocess.run([sys.executable, str(root / "examples" / "learned_optimizer.py"), "--outer-steps", "50",
                        "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "weights" in torch.load(out, weights_only=True)  # a plain weights-only file
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("learned (LSTM)"))
    losses = [float(v) for v in row.split(")")[1].split()]  # steps 0, 10, 20, 40, then the val loss
    assert losses[3] < 0.05 * losses[0], row  # the learned optimizer trains the module
