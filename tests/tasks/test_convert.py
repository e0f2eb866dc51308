"""Converters, on small files written in each dataset's real on-disk format, read back through the real code."""
import io
import pickle

import numpy as np
import pytest
from PIL import Image

from metaray.tasks.convert import (
    CIFAR_FS_TEST,
    CIFAR_FS_VAL,
    from_cifar100,
    from_image_folder,
    from_mini_imagenet,
    from_omniglot,
    from_tiered_imagenet,
)
from metaray.tasks.fewshot import FewShotSource
from metaray.tasks.storage import DatasetError, LabelledDataset, open_dataset

# CIFAR-100's 20 superclasses and their fine classes (the dataset's documented label hierarchy)
CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METARAY_DATA", str(tmp_path / "data"))


def png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def cifar_root(tmp_path):
    fine = sorted(f for fs in CIFAR100.values() for f in fs)
    coarse = sorted(CIFAR100)
    coarse_of = {f: coarse.index(c) for c, fs in CIFAR100.items() for f in fs}
    base = tmp_path / "cifar" / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine, "coarse_label_names": coarse}, f)
    for part, per in (("train", 2), ("test", 1)):
        labels = [i for i in range(100) for _ in range(per)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        with open(base / part, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [coarse_of[fine[i]] for i in labels],
                         "filenames": [f"{i}.png" for i in range(len(labels))], "batch_label": part}, f)
    return tmp_path / "cifar", fine


@pytest.mark.parametrize("scheme,sizes", [("cifar-fs", (64, 16, 20)), ("fc100", (60, 20, 20))])
def test_cifar100_class_splits(cifar_root, tmp_path, scheme, sizes):
    root, fine = cifar_root
    ds = open_dataset(from_cifar100(root, tmp_path / f"{scheme}.parquet", scheme=scheme), cache_dir=tmp_path / "c")
    splits = ds.info.class_splits
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == sizes
    if scheme == "cifar-fs":
        assert set(splits["val"]) == set(CIFAR_FS_VAL) and set(splits["test"]) == set(CIFAR_FS_TEST)
    else:  # FC100: whole superclasses per split (Oreshkin et al.: test = superclasses 0, 7, 12, 14)
        test_super = {c for c, fs in CIFAR100.items() if set(fs) <= set(splits["test"])}
        assert test_super == {"aquatic_mammals", "insects", "medium_mammals", "people"}
    assert ds.shape == (3, 32, 32) and len(ds) == 300 and ds.classes == tuple(fine)
    # pixel layout: a CIFAR row is 1024 red, 1024 green, 1024 blue values, row-major
    with open(root / "cifar-100-python" / "train", "rb") as f:
        first = pickle.load(f)["data"][0]
    np.testing.assert_array_equal(ds.images([0])[0], first.reshape(3, 32, 32))
    FewShotSource(ds, ways=5, shots=1, queries=2).sample(("test", 0, 0))


def test_cifar100_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="CIFAR-100 root directory does not exist"):
        from_cifar100(tmp_path / "nowhere", tmp_path / "x.parquet")
    (tmp_path / "c" / "cifar-100-python").mkdir(parents=True)
    with pytest.raises(DatasetError) as e:
        from_cifar100(tmp_path / "c", tmp_path / "x.parquet")
    assert "cifar-100-python/meta: missing CIFAR-100 meta file" in str(e.value)


def test_mini_imagenet_pickles(tmp_path):
    rng = np.random.default_rng(1)
    originals = {}
    for mode, names in (("train", ["n01", "n02", "n03"]), ("validation", ["n04", "n05"]), ("test", ["n06", "n07"])):
        per = 4
        data = rng.integers(0, 256, size=(per * len(names), 12, 12, 3), dtype=np.uint8)
        order = rng.permutation(len(data))  # class_dict rows need not be contiguous
        class_dict = {n: order[i * per : (i + 1) * per].tolist() for i, n in enumerate(names)}
        with open(tmp_path / f"mini-imagenet-cache-{mode}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)
        for n, rows in class_dict.items():
            originals[n] = data[rows].transpose(0, 3, 1, 2)
    ds = open_dataset(from_mini_imagenet(tmp_path, tmp_path / "mini.parquet"), cache_dir=tmp_path / "c")
    assert ds.info.class_splits == {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
    for c, name in enumerate(ds.classes):
        np.testing.assert_array_equal(ds.images(ds.class_indices[c]), originals[name])
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="mini-imagenet-cache-test.pkl: not a readable pickle"):
        from_mini_imagenet(tmp_path, tmp_path / "mini2.parquet")
    (tmp_path / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(DatasetError, match="mini-imagenet-cache-test.pkl: missing mini-ImageNet test file"):
        from_mini_imagenet(tmp_path, tmp_path / "mini2.parquet")


def write_tiered(root, corrupt=None):
    base = root / "tiered-imagenet"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    originals = {}
    for split, n_cls in (("train", 3), ("val", 2), ("test", 2)):
        ids = np.repeat(np.arange(n_cls), 3)
        arrays = rng.integers(0, 256, size=(len(ids), 10, 10, 3), dtype=np.uint8)
        # the original pickles hold each PNG file as a 1-D uint8 array (cv2.imencode output)
        blobs = [np.frombuffer(png_bytes(a), dtype=np.uint8) for a in arrays]
        if corrupt == split:
            blobs[4] = blobs[4][:30]
        with open(base / f"{split}_images_png.pkl", "wb") as f:
            pickle.dump(blobs, f)
        names = [f"{split}_class{i}" for i in range(n_cls)]
        with open(base / f"{split}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": ids, "label_general": ids // 2, "label_specific_str": names,
                         "label_general_str": ["g"] * n_cls}, f)
        for i, n in enumerate(names):
            originals[n] = arrays[ids == i].transpose(0, 3, 1, 2)
    return originals


def test_tiered_imagenet_pickles(tmp_path):
    originals = write_tiered(tmp_path)
    ds = open_dataset(from_tiered_imagenet(tmp_path, tmp_path / "tiered.parquet"), cache_dir=tmp_path / "c")
    assert ds.info.encoding == "png" and ds.shape == (3, 10, 10) and ds.num_classes == 7
    assert ds.info.class_splits["val"] == ["val_class0", "val_class1"]
    for c, name in enumerate(ds.classes):
        np.testing.assert_array_equal(ds.images(ds.class_indices[c]), originals[name])


def test_tiered_imagenet_corrupt_image_named(tmp_path):
    write_tiered(tmp_path, corrupt="val")
    with pytest.raises(DatasetError) as e:
        from_tiered_imagenet(tmp_path, tmp_path / "tiered.parquet")
    assert "val_images_png.pkl: image 4: corrupt image" in str(e.value)


def test_image_folder_nested_and_errors(tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(3)
    truth = {}
    for cls in ("alpha/one", "alpha/two", "beta/three"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
            truth.setdefault(cls, []).append(arr.transpose(2, 0, 1))
    (root / "alpha" / "notes.txt").write_text("not an image")
    ds = open_dataset(from_image_folder(root, tmp_path / "f.parquet"), cache_dir=tmp_path / "c")
    assert ds.classes == ("alpha/one", "alpha/two", "beta/three") and ds.shape == (3, 6, 5)
    for c, name in enumerate(ds.classes):
        np.testing.assert_array_equal(ds.images(ds.class_indices[c]), np.stack(truth[name]))
    gray = open_dataset(from_image_folder(root, tmp_path / "g.parquet", grayscale=True, size=(4, 4), encoding="raw"), cache_dir=tmp_path / "c")
    assert gray.shape == (1, 4, 4) and gray.info.encoding == "raw"
    # a corrupt image file: the error names it
    bad = root / "beta" / "three" / "9.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError) as e:
        from_image_folder(root, tmp_path / "h.parquet")
    assert str(bad) in str(e.value) and "corrupt image" in str(e.value)
    with pytest.raises(DatasetError, match="image folder root directory does not exist"):
        from_image_folder(tmp_path / "missing", tmp_path / "h.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no image files"):
        from_image_folder(tmp_path / "empty", tmp_path / "h.parquet")
    assert not (tmp_path / "h.parquet").exists()  # failed conversions leave no partial file


def test_omniglot_layout(tmp_path):
    base = tmp_path / "omni" / "omniglot-py"
    rng = np.random.default_rng(4)
    for part, alphabets in (("background", ["Latin", "Greek"]), ("evaluation", ["Atlantean", "Bengali", "Kannada"])):
        for a in alphabets:
            for ch in ("character01", "character02"):
                d = base / f"images_{part}" / a / ch
                d.mkdir(parents=True)
                for i in range(3):
                    Image.fromarray((rng.random((20, 20)) > 0.5).astype(np.uint8) * 255).save(d / f"{i}.png")
    ds = open_dataset(from_omniglot(tmp_path / "omni", tmp_path / "o.parquet", size=28), cache_dir=tmp_path / "c")
    assert ds.shape == (1, 28, 28) and ds.num_classes == 10 and len(ds) == 30
    s = ds.info.class_splits
    assert sorted(s["train"]) == ["Greek/character01", "Greek/character02", "Latin/character01", "Latin/character02"]
    assert sorted(s["val"]) == ["Atlantean/character01", "Atlantean/character02", "Kannada/character01", "Kannada/character02"]
    assert sorted(s["test"]) == ["Bengali/character01", "Bengali/character02"]
    with pytest.raises(DatasetError, match="no images_background/ or images_evaluation/"):
        from_omniglot(tmp_path, tmp_path / "o2.parquet")


def test_from_real_torchvision_datasets(tmp_path):
    """Any torchvision dataset instance converts: FakeData (PIL images), ImageFolder, and tensor transforms."""
    from torchvision import datasets, transforms

    fake = datasets.FakeData(size=12, image_size=(3, 6, 6), num_classes=3, random_offset=5)
    ds = LabelledDataset.from_torch(fake, classes=["a", "b", "c"], name="fake")
    assert len(ds) == 12 and ds.shape == (3, 6, 6)
    img, label = fake[4]
    np.testing.assert_array_equal(ds.images([4])[0], np.asarray(img).transpose(2, 0, 1))
    assert ds.labels[4] == label
    back = open_dataset(ds.save(tmp_path / "fake.parquet", encoding="png"), cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(back.images(range(12)), ds.images(range(12)))
    assert back.classes == ("a", "b", "c") and back.name == "fake"
    root = tmp_path / "folder"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((5, 5), 40 * i + (cls == "dog") * 100, dtype=np.uint8)).save(root / cls / f"{i}.png")
    folder = datasets.ImageFolder(root, transform=transforms.Compose([transforms.Grayscale(), transforms.ToTensor()]))
    ds = LabelledDataset.from_torch(folder)
    assert ds.classes == ("cat", "dog") and ds.shape == (1, 5, 5)
    assert ds.images([3])[0, 0, 0, 0] == 140 and ds.labels.tolist() == [0, 0, 1, 1]
