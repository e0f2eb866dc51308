"""N-way K-shot episodes: determinism in the key (across processes and restarts), remapping, splits, errors."""
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from metaray.tasks import Episode
from metaray.tasks.fewshot import FewShotSource, nearest_centroid_accuracy, split_classes
from metaray.tasks.storage import DatasetError, write_dataset

N_CLASSES, PER_CLASS = 30, 12


def coded_images():
    """Images whose pixels say who they are: channel 0 = class id, channel 1 = index within the class, the rest
    noise; so every episode can be checked against the truth."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(N_CLASSES * PER_CLASS, 3, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    imgs[:, 0] = (labels * 5)[:, None, None]
    imgs[:, 1] = np.tile(np.arange(PER_CLASS), N_CLASSES)[:, None, None] * 7
    return imgs, labels


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METARAY_DATA", str(tmp_path / "data"))  # never touch the user's ~/.cache/metaray


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("fewshot")
    imgs, labels = coded_images()
    return write_dataset(d / "coded.parquet", imgs, labels, [f"c{i:02d}" for i in range(N_CLASSES)], name="coded"), d / "cache"


def test_episode_contents_and_label_remapping(dataset_path):
    path, cache = dataset_path
    from metaray.tasks.storage import open_dataset

    src = FewShotSource(open_dataset(path, cache_dir=cache), ways=5, shots=2, queries=3)
    ep = src.sample(("train", 3, 1))
    assert isinstance(ep, Episode)
    assert ep.support_x.shape == (10, 3, 8, 8) and ep.query_x.shape == (15, 3, 8, 8) and ep.support_x.dtype == torch.float32
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and ep.query_y.tolist() == [i for i in range(5) for _ in range(3)]
    true = torch.tensor(ep.info["labels"])
    assert len(set(ep.info["labels"])) == 5
    assert ep.info["classes"] == [f"c{c:02d}" for c in ep.info["labels"]]
    for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
        cls = (x[:, 0, 0, 0] * 255 / 5).round().long()
        assert torch.equal(cls, true[y])  # remapped label y is the drawn class true[y]
    # support and query samples of one class are distinct images
    within = lambda x: (x[:, 1, 0, 0] * 255 / 7).round().long()
    for c in range(5):
        s = set(within(ep.support_x[ep.support_y == c]).tolist())
        q = set(within(ep.query_x[ep.query_y == c]).tolist())
        assert len(s) == 2 and len(q) == 3 and not s & q


def test_same_key_same_episode_different_key_different(dataset_path):
    path, cache = dataset_path
    from metaray.tasks.storage import open_dataset

    src = FewShotSource(open_dataset(path, cache_dir=cache), ways=5, shots=1, queries=4, seed=7)
    a = src.sample(("train", 0, 0))
    torch.manual_seed(123)  # global RNG state must not matter
    torch.rand(10)
    b = src.sample(("train", 0, 0))
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x) and a.info == b.info
    others = [src.sample(k).info["labels"] for k in [("train", 0, 1), ("train", 1, 0)]]
    assert a.info["labels"] not in others
    other_seed = FewShotSource(src.dataset, ways=5, shots=1, queries=4, seed=8).sample(("train", 0, 0))
    assert not torch.equal(a.support_x, other_seed.support_x)


def test_splits_are_disjoint_by_class(dataset_path):
    path, cache = dataset_path
    from metaray.tasks.storage import open_dataset

    src = FewShotSource(open_dataset(path, cache_dir=cache), ways=3, shots=1, queries=1)
    pools = {s: set(src.split_classes(s)) for s in ("train", "val", "test")}
    assert [len(pools[s]) for s in ("train", "val", "test")] == [19, 5, 6]  # round(0.64·30), round(0.16·30), rest
    assert not (pools["train"] & pools["val"]) and not (pools["train"] & pools["test"]) and not (pools["val"] & pools["test"])
    for split in pools:
        seen = set()
        for i in range(40):
            seen |= set(src.sample((split, 0, i)).info["classes"])
        assert seen <= pools[split] and len(seen) > 0.8 * len(pools[split])
    again = split_classes([f"c{i:02d}" for i in range(N_CLASSES)])  # the default split is a fixed function of the names
    assert {s: set(v) for s, v in again.items()} == pools


def test_dataset_splits_in_metadata_are_used(tmp_path):
    imgs, labels = coded_images()
    names = [f"c{i:02d}" for i in range(N_CLASSES)]
    splits = {"train": names[:20], "test": names[20:]}
    path = write_dataset(tmp_path / "s.parquet", imgs, labels, names, class_splits=splits)
    src = FewShotSource(str(path), ways=5, shots=1, queries=1)
    assert src.split_classes("train") == names[:20] and src.split_classes("test") == names[20:]
    with pytest.raises(DatasetError, match=r"split 'val' has no classes; splits with classes: \['test', 'train'\]"):
        src.sample(("val", 0, 0))


SUBPROCESS = textwrap.dedent(
    """
    import pickle, sys, torch
    from metaray.tasks.fewshot import FewShotSource
    keys = [("train", 0, 0), ("val", 3, 2), ("test", 10, 5)]
    if sys.argv[1] == "pickle":                 # a worker receiving the pickled source
        src = pickle.load(open(sys.argv[2], "rb"))
    else:                                       # a restart: built again from the file
        from torchvision.transforms import v2
        from metaray.tasks.storage import open_dataset
        aug = v2.RandomAffine(degrees=20, translate=(0.1, 0.1))
        src = FewShotSource(open_dataset(sys.argv[2], cache_dir=sys.argv[3]), ways=4, shots=2, queries=3, seed=5, augment=aug)
    torch.save([src.sample(k) for k in keys], sys.argv[4])
    """
)


def test_same_key_identical_in_another_process_and_after_restart(dataset_path, tmp_path):
    path, cache = dataset_path
    from metaray.tasks.storage import open_dataset

    aug = v2.RandomAffine(degrees=20, translate=(0.1, 0.1))
    src = FewShotSource(open_dataset(path, cache_dir=cache), ways=4, shots=2, queries=3, seed=5, augment=aug)
    keys = [("train", 0, 0), ("val", 3, 2), ("test", 10, 5)]
    mine = [src.sample(k) for k in keys]
    plain = FewShotSource(src.dataset, ways=4, shots=2, queries=3, seed=5).sample(keys[0])
    assert not torch.equal(plain.support_x, mine[0].support_x)  # the augmentation did something
    assert plain.info["labels"] == mine[0].info["labels"]  # ... to the same drawn images
    blob = tmp_path / "src.pkl"
    blob.write_bytes(pickle.dumps(src))
    assert blob.stat().st_size < 10_000  # the source travels as its file path, not its data
    script = tmp_path / "child.py"
    script.write_text(SUBPROCESS)
    for mode, arg in (("pickle", blob), ("restart", path)):
        out = tmp_path / f"{mode}.pt"
        subprocess.run([sys.executable, str(script), mode, str(arg), str(cache), str(out)], check=True, timeout=120)
        theirs = torch.load(out, weights_only=False)
        for a, b in zip(mine, theirs):
            for f in ("support_x", "support_y", "query_x", "query_y"):
                assert torch.equal(getattr(a, f), getattr(b, f)), (mode, f)
            assert a.info == b.info


def test_too_few_classes_or_samples(dataset_path):
    path, cache = dataset_path
    with pytest.raises(DatasetError) as e:
        FewShotSource(str(path), ways=6, shots=1, queries=1)
    assert str(path) in str(e.value) and "split 'val' has 5 classes, too few for 6-way" in str(e.value)
    with pytest.raises(DatasetError) as e:
        FewShotSource(str(path), ways=2, shots=5, queries=8)
    assert str(path) in str(e.value) and "fewer than shots + queries = 5 + 8 = 13 samples" in str(e.value)
    with pytest.raises(ValueError, match="ways must be an int >= 1"):
        FewShotSource(str(path), ways=0)
    with pytest.raises(DatasetError, match="does not exist"):
        FewShotSource(str(path) + ".missing")
    with pytest.raises(ValueError, match="split must be one of"):
        FewShotSource(str(path), ways=2, queries=1).sample(("meta-train", 0, 0))
    with pytest.raises(DatasetError, match="not in the dataset"):
        FewShotSource(str(path), ways=2, class_splits={"train": ["nope"]})


def test_nearest_centroid_baseline_is_exact_on_separable_episode():
    # two classes at constant 0.2 and 0.8, queries at 0.3 (class 0) and 0.7 (class 1): accuracy 1; swap → 0
    sx = torch.tensor([0.2, 0.8]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    qx = torch.tensor([0.3, 0.7]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    ep = Episode(sx, torch.tensor([0, 1]), qx, torch.tensor([0, 1]))
    assert nearest_centroid_accuracy(ep) == 1.0
    assert nearest_centroid_accuracy(Episode(sx, torch.tensor([0, 1]), qx, torch.tensor([1, 0]))) == 0.0
