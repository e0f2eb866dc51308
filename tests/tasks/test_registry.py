"""Problems and datasets by name: every registered problem builds and evaluates, options are validated."""
import math

import numpy as np
import pytest
import torch

from metaray.tasks import registry as R
from metaray.tasks.storage import write_dataset

KEY = ("train", 0, 0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METARAY_DATA", str(tmp_path / "data"))


def evaluate(spec):
    task = spec.source.sample(KEY)
    y = spec.problem.init_inner(spec.x0, task)
    return float(spec.problem.inner_loss(spec.x0, y, task)), float(spec.problem.outer_loss(spec.x0, y, task))


def test_problem_names():
    assert set(R.problem_names()) >= {
        "fewshot-maml", "fewshot-features", "sinusoid", "hyper-cleaning", "l2-regularization",
        "quadratic", "toy1d", "bda-toy", "least-squares",
    }
    rows = R.describe_problems()
    assert all(r["description"] for r in rows)
    assert R.problem_options("hyper-cleaning")["corruption"] == 0.5


def test_single_task_problems_have_their_known_starting_values():
    # hyper-cleaning at λ = 0, W = 0: every sample weighs σ(0) = ½ and every CE is log 10
    inner, outer = evaluate(R.make_problem("hyper-cleaning", corruption=0.3, train=100, val=100))
    assert math.isclose(inner, 0.5 * math.log(10), rel_tol=1e-12) and math.isclose(outer, math.log(10), rel_tol=1e-12)
    # paper 003's 1D problem at λ = θ0 = ½: L_V = 0, L_T = θ³/3 − (1 − λ²) θ
    inner, outer = evaluate(R.make_problem("toy1d", lam=0.5))
    assert outer == 0.0 and math.isclose(inner, 0.125 / 3 - 0.75 * 0.5, rel_tol=1e-12)
    # BDA toy at x = y = 0: F = ½ ‖0 − 1‖² = n / 2
    assert evaluate(R.make_problem("bda-toy", n=6)) == (0.0, 3.0)
    for name in ("quadratic", "least-squares", "sinusoid", "l2-regularization"):
        inner, outer = evaluate(R.make_problem(name))
        assert math.isfinite(inner) and math.isfinite(outer) and outer > 0


def test_model_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = R.make_problem("sinusoid", seed=1).x0
    assert torch.equal(torch.get_rng_state(), state)
    b = R.make_problem("sinusoid", seed=1).x0
    c = R.make_problem("sinusoid", seed=2).x0
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)


def test_fewshot_problems_on_a_parquet_dataset(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(20 * 6, 1, 28, 28), dtype=np.uint8)
    path = write_dataset(tmp_path / "d.parquet", imgs, np.repeat(np.arange(20), 6), [f"c{i}" for i in range(20)])
    spec = R.make_problem("fewshot-maml", dataset=str(path), ways=3, shots=1, queries=2, hidden=8)
    task = spec.source.sample(KEY)
    assert task.support_x.shape == (3, 1, 28, 28)
    assert spec.x0["classifier.weight"].shape == (3, 8)
    inner, outer = evaluate(spec)
    assert abs(inner - math.log(3)) < 0.5 and abs(outer - math.log(3)) < 0.5  # a fresh 3-way classifier
    spec = R.make_problem("fewshot-features", dataset=path, ways=3, shots=2, queries=2, hidden=8)
    assert "head.log_lam" in spec.x0 and all(math.isfinite(v) for v in evaluate(spec))
    assert spec.options["ways"] == 3 and spec.options["inner"] == "ridge"


def test_bad_names_and_options():
    with pytest.raises(ValueError, match=r"unknown problem 'sinusiod' \(did you mean 'sinusoid'\?\); valid: \["):
        R.make_problem("sinusiod")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['way'\] for problem 'fewshot-maml'; valid: \["):
        R.make_problem("fewshot-maml", way=5)
    with pytest.raises(TypeError, match="option 'ways' of problem 'fewshot-maml' must be int, got 5.0"):
        R.make_problem("fewshot-maml", ways=5.0)
    with pytest.raises(ValueError, match="corruption must be a number in"):
        R.make_problem("hyper-cleaning", corruption=1.5)
    with pytest.raises(ValueError, match="dataset file does not exist"):
        R.make_problem("fewshot-maml", dataset="/no/such/file.parquet")


def test_dataset_listing(tmp_path, monkeypatch):
    data = tmp_path / "data"
    imgs = np.zeros((4, 1, 2, 2), dtype=np.uint8)
    write_dataset(data / "mine.parquet", imgs, [0, 0, 1, 1], ["a", "b"], name="mine", source="hand made")
    rows = {r["name"]: r for r in R.describe_datasets()}
    assert rows["glyphs"]["classes"] >= 1000 and rows["glyphs"]["samples"] == 20 * rows["glyphs"]["classes"]
    assert "SYNTHETIC" in rows["glyphs"]["source"]
    assert rows["digits"]["classes"] == 10 and rows["digits"]["samples"] == 1797
    assert {"sinusoid", "omniglot", "cifar-fs", "fc100", "mini-imagenet", "tiered-imagenet"} <= set(rows)
    assert rows["mine"]["classes"] == 2 and rows["mine"]["samples"] == 4 and "hand made" in rows["mine"]["source"]
    assert R.dataset_names()[:3] == ["glyphs", "digits", "sinusoid"]
    assert set(rows[n]["offline"] for n in ("glyphs", "digits", "sinusoid")) == {True}


def test_fewshot_on_the_builtin_glyph_set(tmp_path):
    """dataset='glyphs' builds (once) and caches the glyph set under $METARAY_DATA."""
    spec = R.make_problem("fewshot-maml", classes=40, ways=5, shots=1, queries=3, hidden=8)
    assert (tmp_path / "data" / "glyphs-v2-c40-s20-seed0.parquet").exists()
    task = spec.source.sample(("test", 0, 0))
    assert task.support_x.shape == (5, 1, 28, 28) and spec.source.dataset.name == "glyphs"
    again = R.make_problem("fewshot-maml", classes=40, ways=5, shots=1, queries=3, hidden=8).source.sample(("test", 0, 0))
    assert torch.equal(task.query_x, again.query_x)
