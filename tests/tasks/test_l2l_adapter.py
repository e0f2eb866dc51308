"""learn2learn adapter, with real l2l transforms (NWays, KShots, LoadData, RemapLabels) on a real MetaDataset."""
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

l2l = pytest.importorskip("learn2learn")
from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels  # noqa: E402

from metaray.tasks.l2l import L2LSource, split_episode, to_l2l_metadataset  # noqa: E402
from metaray.tasks.storage import LabelledDataset  # noqa: E402

N_CLASSES, PER_CLASS = 12, 8


def coded_dataset():
    """A TensorDataset whose images carry (class, index) in their pixels, so every task can be checked."""
    x = torch.rand(N_CLASSES * PER_CLASS, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    x[:, 0, 0, 0] = y.double().float()
    x[:, 0, 0, 1] = torch.arange(len(y)).float()
    return torch.utils.data.TensorDataset(x, y)


def make_tasksets():
    """A picklable factory, as users ship to workers: train on classes 0-7, test on 8-11."""
    ds = coded_dataset()
    out = {}
    for split, classes in (("train", range(0, 8)), ("test", range(8, 12))):
        idx = [i for i in range(len(ds)) if int(ds.tensors[1][i]) in classes]
        meta = l2l.data.MetaDataset(torch.utils.data.Subset(ds, idx))
        out[split] = l2l.data.Taskset(meta, [NWays(meta, n=3), KShots(meta, k=4), LoadData(meta), RemapLabels(meta)], num_tasks=-1)
    return out


def check_episode(ep, shots=1, queries=3, ways=3):
    assert ep.support_x.shape == (ways * shots, 1, 4, 4) and ep.query_x.shape == (ways * queries, 1, 4, 4)
    assert ep.support_y.tolist() == [c for c in range(ways) for _ in range(shots)]
    true_s = ep.support_x[:, 0, 0, 0].long()
    true_q = ep.query_x[:, 0, 0, 0].long()
    # one true class per remapped label, shared by support and query, and distinct across labels
    for c in range(ways):
        ts, tq = set(true_s[ep.support_y == c].tolist()), set(true_q[ep.query_y == c].tolist())
        assert len(ts) == 1 and ts == tq
    assert len(set(true_s.tolist())) == ways
    # support and query images are distinct samples
    assert not set(ep.support_x[:, 0, 0, 1].tolist()) & set(ep.query_x[:, 0, 0, 1].tolist())


def test_l2l_taskset_as_task_source_is_deterministic_per_key():
    src = L2LSource(make_tasksets(), shots=1, seed=3)
    a = src.sample(("train", 0, 0))
    check_episode(a)
    assert set(a.support_x[:, 0, 0, 0].long().tolist()) <= set(range(8))
    random.seed(99)  # the caller's RNG state must not matter...
    torch.manual_seed(99)
    state = (random.getstate(), torch.get_rng_state())
    b = src.sample(("train", 0, 0))
    assert (random.getstate(), torch.get_rng_state().tolist()) == (state[0], state[1].tolist())  # ...nor change
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    draws = {tuple(src.sample(("train", 0, i)).support_x[:, 0, 0, 1].long().tolist()) for i in range(10)}
    assert len(draws) >= 8  # different keys give different tasks
    t = src.sample(("test", 4, 1))
    check_episode(t)
    assert set(t.support_x[:, 0, 0, 0].long().tolist()) <= set(range(8, 12))  # test split has its own classes
    with pytest.raises(ValueError, match=r"no learn2learn taskset for split 'val'; have \['test', 'train'\]"):
        src.sample(("val", 0, 0))


CHILD = textwrap.dedent(
    """
    import pickle, sys, torch
    sys.path.insert(0, sys.argv[1])
    src = pickle.load(open(sys.argv[2], "rb"))
    torch.save([src.sample(("train", s, i)) for s in range(2) for i in range(3)], sys.argv[3])
    """
)


def test_same_tasks_in_another_process(tmp_path):
    import os

    src = L2LSource(make_tasksets, shots=1, seed=11)  # factory form: pickles without the data
    mine = [src.sample(("train", s, i)) for s in range(2) for i in range(3)]
    blob = tmp_path / "src.pkl"
    blob.write_bytes(pickle.dumps(src))
    (tmp_path / "child.py").write_text(CHILD)
    here = os.path.dirname(__file__)
    subprocess.run([sys.executable, str(tmp_path / "child.py"), here, str(blob), str(tmp_path / "out.pt")], check=True, timeout=120)
    theirs = torch.load(tmp_path / "out.pt", weights_only=False)
    for a, b in zip(mine, theirs):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


def test_finite_task_pool():
    ds = coded_dataset()
    meta = l2l.data.MetaDataset(ds)
    ts = l2l.data.Taskset(meta, [NWays(meta, n=2), KShots(meta, k=2), LoadData(meta)], num_tasks=4)
    src = L2LSource({"train": ts}, shots=1)
    pool = {tuple(src.sample(("train", 0, i)).support_x[:, 0, 0, 1].long().tolist()) for i in range(60)}
    assert 2 <= len(pool) <= 4  # l2l's num_tasks: a fixed pool, the same in every process


def test_reverse_metaray_dataset_in_l2l_pipeline():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(N_CLASSES * PER_CLASS, 1, 4, 4), dtype=np.uint8)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    imgs[:, 0, 0, 0] = labels
    names = [f"k{i}" for i in range(N_CLASSES)]
    ds = LabelledDataset.from_arrays(imgs, labels, names, class_splits={"train": names[:9], "test": names[9:]})
    meta = to_l2l_metadataset(ds, split="test")
    assert sorted(meta.labels_to_indices) == [9, 10, 11] and len(meta) == 3 * PER_CLASS
    ts = l2l.data.Taskset(meta, [NWays(meta, n=3), KShots(meta, k=3), LoadData(meta), RemapLabels(meta)])
    ep = L2LSource({"test": ts}, shots=2).sample(("test", 0, 0))
    true = (ep.support_x[:, 0, 0, 0] * 255).round().long()
    assert set(true.tolist()) == {9, 10, 11}
    for c in range(3):
        assert len(set(true[ep.support_y == c].tolist())) == 1


def test_split_episode_errors():
    with pytest.raises(ValueError, match="more than shots=2 samples"):
        split_episode(torch.zeros(4, 1), torch.tensor([0, 0, 1, 1]), shots=2)
    with pytest.raises(TypeError, match="is not a learn2learn TaskDataset"):
        L2LSource({"train": [1, 2, 3]}, shots=1)
    with pytest.raises(ValueError, match="shots must be an int >= 1"):
        L2LSource(make_tasksets, shots=0)
