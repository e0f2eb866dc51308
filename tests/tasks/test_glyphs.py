"""The offline glyph set: reproducible bytes, Omniglot-like shape, and a real (non-trivial) few-shot benchmark."""
import hashlib
import subprocess
import sys
import textwrap
import unicodedata

import numpy as np
import pytest
import torch

from metaray.tasks.fewshot import FewShotSource, nearest_centroid_accuracy
from metaray.tasks.glyphs import build_glyphs, candidate_classes, glyph_fonts, glyphs_path
from metaray.tasks.storage import open_dataset


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METARAY_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="module")
def glyph_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("glyphs")
    path = build_glyphs(d / "glyphs.parquet", classes=150, samples=20, seed=0)
    return open_dataset(path, cache_dir=d / "cache")


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fonts_and_classes():
    fonts = glyph_fonts()
    assert "LastResortHE-Regular.ttf" not in fonts and "DejaVuSans.ttf" in fonts and len(fonts) >= 16
    cands = candidate_classes()
    assert len(cands) >= 1600  # enough distinct characters for the default 1,600 classes
    assert all(len(fonts) >= 8 for _, fonts in cands)
    cps = [cp for cp, _ in cands]
    assert ord("A") in cps and (ord("Α") not in cps)  # Greek capital alpha is Latin A's homoglyph: merged away


def test_build_is_byte_identical_for_one_seed(tmp_path):
    a = build_glyphs(tmp_path / "a.parquet", classes=30, samples=6, seed=3)
    b = build_glyphs(tmp_path / "b.parquet", classes=30, samples=6, seed=3)
    c = build_glyphs(tmp_path / "c.parquet", classes=30, samples=6, seed=4)
    assert sha(a) == sha(b) != sha(c)


def test_glyph_set_looks_like_omniglot(glyph_set):
    ds = glyph_set
    assert ds.shape == (1, 28, 28) and ds.num_classes == 150 and len(ds) == 3000
    assert ds.class_counts().tolist() == [20] * 150
    assert "synthetic" in ds.info.source and ds.name == "glyphs"
    cp = int(ds.classes[0].split()[0][2:], 16)
    assert ds.classes[0] == f"U+{cp:04X} {unicodedata.name(chr(cp))}"
    splits = ds.info.class_splits
    assert sorted(len(v) for v in splits.values()) == [24, 30, 96] and len(set(sum(splits.values(), []))) == 150
    x = ds.raw_view().astype(np.float64) / 255
    ink = x.reshape(len(ds), -1).mean(1)
    # every sample has a visible glyph (thin strokes survive thinning), none is a filled box
    assert x.reshape(len(ds), -1).max(1).min() > 0.5 and ink.min() > 0.003 and np.median(ink) > 0.08 and ink.max() < 0.9
    # samples of one class vary (fonts, strokes, affine maps) but are closer to each other than to other classes
    flat = x.reshape(150, 20, -1)
    within = np.mean([np.linalg.norm(flat[c][:, None] - flat[c][None], axis=-1).sum() / (20 * 19) for c in range(150)])
    between = np.linalg.norm(flat[:, 0][:, None] - flat[:, 0][None], axis=-1).sum() / (150 * 149)
    assert 0.3 * between < within < 0.95 * between


def test_pixel_baseline_is_far_from_solved(glyph_set):
    """Nearest centroid on pixels: well above chance (the classes are learnable) and far below 100% (the
    benchmark is not trivial). The full 1,600-class set measured 0.42 (5-way 1-shot), 0.58 (5-shot), 0.23 (20-way 1-shot)."""
    src = FewShotSource(glyph_set, ways=5, shots=1, queries=5)
    acc = np.mean([nearest_centroid_accuracy(src.sample(("test", 0, i))) for i in range(200)])
    assert 0.28 < acc < 0.6, acc


BUILD = textwrap.dedent(
    """
    import sys, time
    t = time.perf_counter()
    from metaray.tasks.glyphs import build_glyphs
    build_glyphs(sys.argv[1], seed=0)
    print(time.perf_counter() - t)
    """
)


@pytest.mark.slow
def test_full_build_is_byte_identical_in_fresh_processes(tmp_path):
    """The default glyph set (1,600 classes × 20 samples), built twice in fresh processes (fonts loaded cold).
    Its build time is not asserted (30-53 s measured on this 2-core machine, near the 60 s it was once held
    to): a timed test fails when the machine is loaded, so this test only prints the seconds (``pytest -s``)."""
    for name in ("a", "b"):
        out = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / f"{name}.parquet")], check=True,
                             capture_output=True, text=True, timeout=600)
        print(f"glyph build {name}: {float(out.stdout.strip().splitlines()[-1]):.1f} s")
    assert sha(tmp_path / "a.parquet") == sha(tmp_path / "b.parquet")
    ds = open_dataset(tmp_path / "a.parquet", cache_dir=tmp_path / "cache")
    assert ds.num_classes == 1600 and len(ds) == 32000
    assert glyphs_path(1600, 20, 0).name == "glyphs-v2-c1600-s20-seed0.parquet"


@pytest.mark.slow
def test_meta_trained_conv_net_beats_pixel_baseline(tmp_path):
    """R2D2-style meta-training (Conv4 features + closed-form ridge head, solver 'ridge') on the train classes;
    5-way 1-shot accuracy on held-out test classes must clearly beat nearest centroid on pixels."""
    import metaray.solvers as S
    from metaray.tasks.registry import make_problem

    # 400 classes (the split's 256 train classes are plenty for 120 steps) keep the build at ~8 s, not ~22 s
    path = build_glyphs(tmp_path / "g.parquet", classes=400, samples=20, seed=0)
    spec = make_problem("fewshot-features", dataset=str(path), ways=5, shots=1, queries=5, seed=0)
    solver = S.make("ridge")
    torch.manual_seed(0)
    x = {k: v.clone().requires_grad_() for k, v in spec.x0.items()}
    opt = torch.optim.Adam(x.values(), lr=1e-3)

    def test_accuracy(n=100):
        frozen = {k: v.detach() for k, v in x.items()}
        return np.mean([solver.hypergrad(spec.problem, frozen, spec.source.sample(("test", 0, i))).metrics["accuracy"] for i in range(n)])

    baseline = np.mean([nearest_centroid_accuracy(spec.source.sample(("test", 0, i))) for i in range(100)])
    for step in range(120):
        frozen = {k: v.detach() for k, v in x.items()}
        hgs = [solver.hypergrad(spec.problem, frozen, spec.source.sample(("train", step, i))) for i in range(4)]
        for k, v in x.items():
            v.grad = sum(h.grad[k] for h in hgs) / len(hgs)
        opt.step()
    trained = test_accuracy()
    assert trained > baseline + 0.2, (trained, baseline)  # measured: 0.77 vs 0.40 (1,600 classes, 200 steps: 0.85 vs 0.41)
