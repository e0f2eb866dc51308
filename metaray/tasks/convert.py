"""Converters from common on-disk image datasets to metaray Parquet datasets (schema: ``metaray.tasks.storage``).

All take a local ``root`` and never download: fetch the data with the original tools first (torchvision's
``download=True``, learn2learn's benchmark classes), then convert once. Each reads the documented on-disk layout:

- ``from_image_folder``: ``root/<class>/<image files>`` (any depth: a class is a directory that holds images,
  named by its path relative to root, e.g. Omniglot's ``Alphabet/character01``).
- ``from_omniglot``: torchvision's ``Omniglot`` layout ``root/omniglot-py/images_{background,evaluation}/
  <alphabet>/<character>/*.png``; background alphabets → meta-train, evaluation alphabets split alternately
  into meta-val / meta-test.
- ``from_cifar100``: torchvision's ``CIFAR100`` layout ``root/cifar-100-python/{train,test,meta}`` (Python
  pickles, keys ``data`` (N, 3072) uint8, ``fine_labels``, ``coarse_labels``; meta ``fine_label_names``,
  ``coarse_label_names``). Train and test images are pooled (600 per class) and the classes split as CIFAR-FS
  (Bertinetto et al. 2019: 64/16/20 classes) or FC100 (Oreshkin et al. 2018: 12/4/4 superclasses).
- ``from_mini_imagenet``: learn2learn's ``mini-imagenet-cache-{train,validation,test}.pkl``: pickled dicts with
  ``image_data`` (N, 84, 84, 3) uint8 and ``class_dict`` {class name: [row indices]}.
- ``from_tiered_imagenet``: learn2learn's ``tiered-imagenet/{train,val,test}_images_png.pkl`` (a list of PNG
  files, as bytes or uint8 arrays) and ``{split}_labels.pkl`` (dict with ``label_specific`` ids and, when
  present, ``label_specific_str`` names).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .storage import PNG_SIGNATURE, DatasetError, DatasetWriter, iter_batches

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# CIFAR-FS (Bertinetto et al. 2019, the split files of their r2d2 repository): validation and test classes; the
# other 64 CIFAR-100 classes are meta-train.
CIFAR_FS_VAL = (
    "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel", "cattle",
    "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
)
CIFAR_FS_TEST = (
    "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
    "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
)
# FC100 (Oreshkin et al. 2018, TADAM supplementary): superclasses {8, 11, 13, 16} validation, {0, 7, 12, 14} test.
FC100_VAL = ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals")
FC100_TEST = ("aquatic_mammals", "insects", "medium_mammals", "people")


def _require_dir(root: str | os.PathLike, what: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: {what} root directory does not exist")
    return root


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{path}: missing {what} file (is the dataset root right?)")
    return path


def _load_image(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: corrupt image: cannot decode ({e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def image_folder_classes(root: str | os.PathLike) -> dict[str, list[Path]]:
    """{class name: sorted image files}: every directory under root that directly holds image files is a class."""
    root = _require_dir(root, "image folder")
    classes: dict[str, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files = sorted(f for f in filenames if f.lower().endswith(IMAGE_SUFFIXES))
        if files:
            classes[Path(dirpath).relative_to(root).as_posix()] = [Path(dirpath) / f for f in files]
    if not classes:
        raise DatasetError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found in any subdirectory")
    if "." in classes:
        raise DatasetError(f"{root}: images directly under the root have no class; put them in <root>/<class>/")
    return dict(sorted(classes.items()))


def _write_classes(
    out: str | os.PathLike,
    classes: dict[str, list[Path]],
    *,
    mode: str,
    size: tuple[int, int] | None,
    encoding: str,
    name: str,
    source: str,
    class_splits: dict[str, Sequence[str]] | None,
    invert: bool = False,
) -> Path:
    names = list(classes)
    first = _load_image(next(iter(classes.values()))[0], mode, size)
    items = [(label, f) for label, n in enumerate(names) for f in classes[n]]
    with DatasetWriter(out, classes=names, shape=first.shape, encoding=encoding, name=name, source=source, class_splits=class_splits) as w:
        for batch in iter_batches(items, 1024):
            imgs = []
            for _, f in batch:
                img = _load_image(f, mode, size)
                if img.shape != first.shape:
                    raise DatasetError(f"{f}: image has shape {img.shape}, others have {first.shape}; pass size=(H, W) to resize")
                imgs.append(255 - img if invert else img)
            w.write(np.stack(imgs), [label for label, _ in batch])
    return Path(out)


def from_image_folder(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    grayscale: bool = False,
    size: tuple[int, int] | None = None,
    encoding: str = "png",
    name: str | None = None,
    class_splits: dict[str, Sequence[str]] | None = None,
) -> Path:
    """Converts ``root/<class>/<images>`` into a Parquet dataset. Images are decoded (a corrupt one raises an
    error naming it), converted to grayscale or RGB, optionally resized to ``size`` = (H, W), and stored raw or
    as PNG."""
    root = _require_dir(root, "image folder")
    classes = image_folder_classes(root)
    return _write_classes(
        out, classes, mode="L" if grayscale else "RGB", size=size, encoding=encoding,
        name=name or root.name, source=f"image folder {root}", class_splits=class_splits,
    )


def from_omniglot(root: str | os.PathLike, out: str | os.PathLike, *, size: int = 28, invert: bool = True) -> Path:
    """torchvision Omniglot layout → Parquet (grayscale, resized to size×size, inverted to white strokes on black
    by default). Classes are "<alphabet>/<character>"; background alphabets → train, evaluation alphabets
    alternately → val / test."""
    base = _require_dir(root, "Omniglot") / "omniglot-py"
    parts = {p: base / f"images_{p}" for p in ("background", "evaluation")}
    present = {p: d for p, d in parts.items() if d.is_dir()}
    if not present:
        raise DatasetError(f"{base}: no images_background/ or images_evaluation/ directory (torchvision's Omniglot layout)")
    classes: dict[str, list[Path]] = {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for part, d in present.items():
        part_classes = image_folder_classes(d)
        alphabets = sorted({c.split("/")[0] for c in part_classes})
        for c, files in part_classes.items():
            name = c if c not in classes else f"{part}/{c}"
            classes[name] = files
            split = "train" if part == "background" else ("val" if alphabets.index(c.split("/")[0]) % 2 == 0 else "test")
            splits[split].append(name)
    return _write_classes(
        out, classes, mode="L", size=(size, size), encoding="raw", name="omniglot",
        source=f"Omniglot (Lake et al. 2015) from {base}", class_splits={k: v for k, v in splits.items() if v}, invert=invert,
    )


# The only globals the datasets' pickles need: NumPy arrays, dtypes and scalars (NumPy 1.x and 2.x module
# paths), plus the few builtins Python 2/3 pickles name for plain containers and bytes. Anything else (os.system,
# eval, subprocess, ...) is refused before it is looked up, so a swapped or crafted file cannot run code.
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *((m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset", "bytearray", "complex")),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry bytes
})


class _RefusedGlobal(Exception):
    """A global (or persistent id) outside ``_PICKLE_GLOBALS``: raised as a DatasetError by ``_unpickle``."""


class _DatasetUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only ``_PICKLE_GLOBALS``: containers, strings, numbers, bytes and NumPy arrays."""

    def __init__(self, file):
        # latin1: Python 2 pickles (CIFAR-100's) hold str keys and raw array bytes as 8-bit strings
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _RefusedGlobal(f"persistent id {pid!r}")


def _unpickle(path: Path) -> Any:
    """Loads a dataset pickle with ``_DatasetUnpickler`` (never plain pickle.load: the file may not be what it
    claims to be)."""
    try:
        with open(path, "rb") as f:
            return _DatasetUnpickler(f).load()
    except _RefusedGlobal as e:
        raise DatasetError(
            f"{path}: refused to unpickle: the file references {e}, which a dataset pickle never needs (only "
            "containers, strings, numbers and NumPy arrays are allowed); the file may have been tampered with"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError, TypeError, IndexError,
            KeyError) as e:
        raise DatasetError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def _get(d: Any, key: str, path: Path) -> Any:
    if not isinstance(d, dict) or key not in d:
        have = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise DatasetError(f"{path}: expected a dict with key {key!r}, found {have}")
    return d[key]


def from_cifar100(root: str | os.PathLike, out: str | os.PathLike, *, scheme: str = "cifar-fs") -> Path:
    """torchvision CIFAR-100 layout → Parquet with the CIFAR-FS or FC100 class split (raw uint8, 3×32×32)."""
    if scheme not in ("cifar-fs", "fc100"):
        raise ValueError(f"scheme must be 'cifar-fs' or 'fc100', got {scheme!r}")
    base = _require_dir(root, "CIFAR-100") / "cifar-100-python"
    meta = _unpickle(_require_file(base / "meta", "CIFAR-100 meta"))
    fine_names = list(_get(meta, "fine_label_names", base / "meta"))
    coarse_names = list(_get(meta, "coarse_label_names", base / "meta"))
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        path = _require_file(base / part, f"CIFAR-100 {part}")
        d = _unpickle(path)
        data = np.asarray(_get(d, "data", path), dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(f"{path}: 'data' must be (N, 3072) uint8 rows, got shape {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        fine.append(np.asarray(_get(d, "fine_labels", path)))
        coarse.append(np.asarray(_get(d, "coarse_labels", path)))
        if not len(fine[-1]) == len(coarse[-1]) == len(data):
            raise DatasetError(f"{path}: data, fine_labels and coarse_labels have different lengths")
    x, yf, yc = np.concatenate(images), np.concatenate(fine), np.concatenate(coarse)
    if scheme == "cifar-fs":
        val, test = set(CIFAR_FS_VAL), set(CIFAR_FS_TEST)
        split_of = {n: "val" if n in val else "test" if n in test else "train" for n in fine_names}
    else:
        superclass = {fine_names[f]: coarse_names[c] for f, c in zip(yf, yc)}
        split_of = {n: "val" if superclass.get(n) in FC100_VAL else "test" if superclass.get(n) in FC100_TEST else "train" for n in fine_names}
    present = set(fine_names[i] for i in np.unique(yf))
    splits = {s: [n for n in fine_names if split_of[n] == s and n in present] for s in ("train", "val", "test")}
    with DatasetWriter(
        out, classes=fine_names, shape=(3, 32, 32), name=scheme, class_splits=splits,
        source=f"CIFAR-100 ({'Bertinetto et al. 2019' if scheme == 'cifar-fs' else 'Oreshkin et al. 2018'} class split) from {base}",
    ) as w:
        for start in range(0, len(x), 10_000):
            w.write(x[start : start + 10_000], yf[start : start + 10_000])
    return Path(out)


def from_mini_imagenet(root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """learn2learn's mini-ImageNet pickles → Parquet (raw uint8, 3×84×84; splits from the three files)."""
    root = _require_dir(root, "mini-ImageNet")
    parts = []
    for split, mode in (("train", "train"), ("val", "validation"), ("test", "test")):
        path = _require_file(root / f"mini-imagenet-cache-{mode}.pkl", f"mini-ImageNet {mode}")
        d = _unpickle(path)
        data = np.asarray(_get(d, "image_data", path))
        class_dict = _get(d, "class_dict", path)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
            raise DatasetError(f"{path}: image_data must be uint8 (N, H, W, 3), got {data.dtype} {data.shape}")
        if not isinstance(class_dict, dict) or not class_dict:
            raise DatasetError(f"{path}: class_dict must be a non-empty dict {{class name: [row indices]}}")
        parts.append((split, path, data, class_dict))
    shapes = {p[2].shape[1:3] for p in parts}
    if len(shapes) != 1:
        raise DatasetError(f"{root}: the split files hold images of different sizes {sorted(shapes)}")
    h, w_ = shapes.pop()
    classes = [c for _, _, _, cd in parts for c in cd]
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{root}: a class appears in more than one split file")
    splits = {split: list(cd) for split, _, _, cd in parts}
    with DatasetWriter(
        out, classes=classes, shape=(3, h, w_), name="mini-imagenet", class_splits=splits,
        source=f"mini-ImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 splits), learn2learn pickles in {root}",
    ) as w:
        label_of = {c: i for i, c in enumerate(classes)}
        for split, path, data, class_dict in parts:
            for cname, idxs in class_dict.items():
                idxs = np.asarray(idxs, dtype=np.int64)
                if idxs.size and (idxs.min() < 0 or idxs.max() >= len(data)):
                    raise DatasetError(f"{path}: class_dict[{cname!r}] has row indices outside [0, {len(data)})")
                w.write(np.ascontiguousarray(data[idxs].transpose(0, 3, 1, 2)), np.full(len(idxs), label_of[cname]))
    return Path(out)


def from_tiered_imagenet(root: str | os.PathLike, out: str | os.PathLike, *, verify: bool = True) -> Path:
    """learn2learn's tiered-ImageNet pickles → Parquet, keeping the PNG bytes as stored (encoding "png").
    verify=True decodes every image once (a corrupt one raises an error naming the file and index)."""
    from .storage import decode_png

    base = _require_dir(root, "tiered-ImageNet") / "tiered-imagenet"
    _require_dir(base, "tiered-ImageNet")
    parts = []
    shape = None
    for split in ("train", "val", "test"):
        img_path = _require_file(base / f"{split}_images_png.pkl", f"tiered-ImageNet {split} images")
        lab_path = _require_file(base / f"{split}_labels.pkl", f"tiered-ImageNet {split} labels")
        images = _unpickle(img_path)
        labels = _unpickle(lab_path)
        ids = np.asarray(_get(labels, "label_specific", lab_path), dtype=np.int64)
        if len(ids) != len(images):
            raise DatasetError(f"{img_path}: {len(images)} images but {lab_path.name} has {len(ids)} labels")
        names = labels.get("label_specific_str")
        n_ids = int(ids.max()) + 1 if len(ids) else 0
        if names is None or len(names) < n_ids:
            names = [f"{split}/{i}" for i in range(n_ids)]
        blobs = []
        for i, b in enumerate(images):
            b = bytes(np.asarray(b, dtype=np.uint8).tobytes()) if not isinstance(b, bytes) else b
            if not b.startswith(PNG_SIGNATURE):
                raise DatasetError(f"{img_path}: image {i}: corrupt image: not PNG data")
            blobs.append(b)
        if shape is None and blobs:
            from PIL import Image
            import io

            with Image.open(io.BytesIO(blobs[0])) as im:
                shape = (3, im.height, im.width)
        if verify:
            for i, b in enumerate(blobs):
                decode_png(b, shape, f"{img_path}: image {i}")
        parts.append((split, [str(n) for n in names[:n_ids]], ids, blobs))
    classes = [n for _, names, _, _ in parts for n in names]
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{base}: class names repeat across splits")
    offset = 0
    with DatasetWriter(
        out, classes=classes, shape=shape, encoding="png", name="tiered-imagenet",
        class_splits={s: n for s, n, _, _ in parts},
        source=f"tiered-ImageNet (Ren et al. 2018), learn2learn pickles in {base}",
    ) as w:
        for _, names, ids, blobs in parts:
            for start in range(0, len(blobs), 4096):
                w.write(blobs[start : start + 4096], ids[start : start + 4096] + offset)
            offset += len(names)
    return Path(out)
