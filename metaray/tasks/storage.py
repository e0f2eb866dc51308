"""Labelled image datasets in Arrow/Parquet: the on-disk schema, a writer, and a memory-mapped reader.

Schema (``FORMAT = "metaray.labelled/1"``), one row per sample:

    column        type      meaning
    image         binary    encoding "raw": C*H*W uint8 bytes in C, H, W order; encoding "png": a PNG file
    label         int32     class id in [0, number of classes)
    class_name    string    classes[label] (redundant, for humans and other tools)

Schema metadata (UTF-8 keys and values, JSON where structured):

    metaray.format        "metaray.labelled/1"
    metaray.encoding      "raw" or "png"
    metaray.shape         [C, H, W] of every decoded image (JSON list)
    metaray.classes       class names indexed by label (JSON list)
    metaray.class_splits  optional {"train": [names], "val": [names], "test": [names]}, disjoint by class
    metaray.name          short dataset name;   metaray.source   where the data came from (free text)

Parquet is the storage and interchange format. Parquet pages are encoded and compressed, so reading them always
copies into process memory; for sharing, ``open_dataset`` converts the Parquet file once into an uncompressed
Arrow IPC file under the cache directory and memory-maps that. Every process on a node that opens the dataset then
reads the same page-cache pages (file-backed, shared), and only the images an episode uses are copied.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

FORMAT = "metaray.labelled/1"
ENCODINGS = ("raw", "png")
SPLIT_NAMES = ("train", "val", "test")
COLUMNS = {"image": pa.binary(), "label": pa.int32(), "class_name": pa.string()}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CACHE_BATCH_ROWS = 1 << 16  # rows per record batch of the Arrow cache (one zero-copy view per batch)


class DatasetError(ValueError):
    """A dataset file or directory that is missing, malformed or unusable. The message names the file."""


def data_dir() -> Path:
    """Where built and cached datasets live: ``$METARAY_DATA`` if set, else ``~/.cache/metaray``."""
    return Path(os.environ.get("METARAY_DATA") or Path.home() / ".cache" / "metaray")


def check_class_splits(splits: dict[str, Sequence[str]], classes: Sequence[str], where: str) -> dict[str, list[str]]:
    """Splits map 'train'/'val'/'test' to disjoint lists of known class names."""
    if not isinstance(splits, dict):
        raise DatasetError(f"{where}: class splits must be a dict {{split: [class names]}}, got {type(splits).__name__}")
    unknown_splits = sorted(set(splits) - set(SPLIT_NAMES))
    if unknown_splits:
        raise DatasetError(f"{where}: unknown class split names {unknown_splits}; valid: {list(SPLIT_NAMES)}")
    known = set(classes)
    seen: dict[str, str] = {}
    out: dict[str, list[str]] = {}
    for split, names in splits.items():
        names = [str(n) for n in names]
        missing = [n for n in names if n not in known]
        if missing:
            raise DatasetError(f"{where}: class split {split!r} names classes not in the dataset: {missing[:5]}")
        for n in names:
            if n in seen:
                raise DatasetError(f"{where}: class {n!r} is in both splits {seen[n]!r} and {split!r}; splits must be disjoint")
            seen[n] = split
        out[split] = names
    return out


@dataclass(frozen=True)
class DatasetInfo:
    """What the schema metadata says about a dataset."""

    name: str
    source: str
    encoding: str
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    class_splits: dict[str, list[str]] | None

    def metadata(self) -> dict[bytes, bytes]:
        md = {
            "metaray.format": FORMAT,
            "metaray.name": self.name,
            "metaray.source": self.source,
            "metaray.encoding": self.encoding,
            "metaray.shape": json.dumps(list(self.shape)),
            "metaray.classes": json.dumps(list(self.classes)),
        }
        if self.class_splits is not None:
            md["metaray.class_splits"] = json.dumps(self.class_splits)
        return {k.encode(): v.encode() for k, v in md.items()}

    @classmethod
    def from_schema(cls, schema: pa.Schema, where: str) -> "DatasetInfo":
        problems = []
        for col, typ in COLUMNS.items():
            idx = schema.get_field_index(col)
            if idx < 0:
                problems.append(f"missing column {col!r} ({typ})")
            elif not (schema.field(idx).type == typ or (col == "image" and schema.field(idx).type == pa.large_binary())):
                problems.append(f"column {col!r} has type {schema.field(idx).type}, expected {typ}")
        try:
            md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        except UnicodeDecodeError as e:
            raise DatasetError(f"{where}: corrupt schema metadata (not UTF-8: {e})") from None
        if md.get("metaray.format") != FORMAT:
            problems.append(f"schema metadata 'metaray.format' is {md.get('metaray.format')!r}, expected {FORMAT!r}")
        if problems:
            raise DatasetError(
                f"{where}: not a metaray labelled dataset: {'; '.join(problems)}. Expected columns "
                f"{', '.join(f'{c}: {t}' for c, t in COLUMNS.items())} and metadata metaray.format = {FORMAT!r} "
                "(see metaray.tasks.storage for the schema)"
            )
        try:
            encoding = md["metaray.encoding"]
            shape = tuple(int(s) for s in json.loads(md["metaray.shape"]))
            classes = tuple(str(c) for c in json.loads(md["metaray.classes"]))
            splits = json.loads(md["metaray.class_splits"]) if "metaray.class_splits" in md else None
        except (KeyError, ValueError, TypeError) as e:
            raise DatasetError(f"{where}: bad or missing schema metadata ({type(e).__name__}: {e})") from None
        if encoding not in ENCODINGS:
            raise DatasetError(f"{where}: metaray.encoding is {encoding!r}; valid: {list(ENCODINGS)}")
        if len(shape) != 3 or min(shape) < 1:
            raise DatasetError(f"{where}: metaray.shape must be [C, H, W] with positive sizes, got {list(shape)}")
        if len(set(classes)) != len(classes):
            raise DatasetError(f"{where}: metaray.classes has duplicate class names")
        if splits is not None:
            splits = check_class_splits(splits, classes, where)
        return cls(md.get("metaray.name", ""), md.get("metaray.source", ""), encoding, shape, classes, splits)


def _as_chw(images: np.ndarray, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DatasetError(f"{where}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:  # (N, H, W) grayscale
        images = images[:, None]
    if images.ndim != 4:
        raise DatasetError(f"{where}: images must have shape (N, C, H, W) or (N, H, W), got {images.shape}")
    return images


def encode_png(image_chw: np.ndarray) -> bytes:
    """PNG bytes of one uint8 (C, H, W) image, C in {1, 3}. Fixed settings, so the bytes are reproducible."""
    from PIL import Image

    c = image_chw.shape[0]
    arr = image_chw[0] if c == 1 else np.ascontiguousarray(image_chw.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L" if c == 1 else "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes, shape: tuple[int, int, int], where: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    c = shape[0]
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if c == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{where}: corrupt image: cannot decode PNG ({e})") from None
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    if arr.shape != tuple(shape):
        raise DatasetError(f"{where}: image has shape {arr.shape}, the dataset declares {list(shape)}")
    return arr


class DatasetWriter:
    """Streams batches of (images, labels) into a Parquet file with the metaray schema.

    >>> with DatasetWriter(path, classes=["a", "b"], shape=(1, 28, 28)) as w:
    ...     w.write(images_uint8_NCHW, labels)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        classes: Sequence[str],
        shape: Sequence[int],
        encoding: str = "raw",
        name: str = "",
        source: str = "",
        class_splits: dict[str, Sequence[str]] | None = None,
        compression: str = "zstd",
    ):
        self.path = Path(path)
        where = str(self.path)
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
        classes = [str(c) for c in classes]
        if not classes or len(set(classes)) != len(classes):
            raise DatasetError(f"{where}: classes must be a non-empty list of unique names")
        splits = check_class_splits(dict(class_splits), classes, where) if class_splits is not None else None
        self.info = DatasetInfo(name, source, encoding, tuple(int(s) for s in shape), tuple(classes), splits)
        if len(self.info.shape) != 3:
            raise DatasetError(f"{where}: shape must be (C, H, W), got {tuple(shape)}")
        self.schema = pa.schema([(c, t) for c, t in COLUMNS.items()], metadata=self.info.metadata())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        # page CRCs, verified on every read: a flipped byte in a compressed page is an error, not other pixels
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression=compression, write_page_checksum=True)
        self._class_array = np.array(classes, dtype=object)
        self.rows = 0

    def write(self, images: np.ndarray | Sequence[bytes], labels: Sequence[int]) -> None:
        """images: uint8 (N, C, H, W) / (N, H, W) arrays (encoded as the dataset's encoding), or a sequence of
        already-encoded PNG bytes for a "png" dataset."""
        where = str(self.path)
        labels = np.asarray(labels, dtype=np.int64)
        n_cls = len(self.info.classes)
        if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= n_cls)):
            raise DatasetError(f"{where}: labels must be a 1-D array of class ids in [0, {n_cls})")
        if isinstance(images, np.ndarray):
            images = _as_chw(images, where)
            if images.shape[1:] != self.info.shape:
                raise DatasetError(f"{where}: images have shape {images.shape[1:]}, the dataset declares {self.info.shape}")
            if self.info.encoding == "raw":
                flat = np.ascontiguousarray(images).reshape(len(images), -1)
                blobs = [row.tobytes() for row in flat]
            else:
                blobs = [encode_png(im) for im in images]
        else:
            if self.info.encoding != "png":
                raise DatasetError(f"{where}: pre-encoded bytes need encoding='png'")
            blobs = [bytes(b) for b in images]
            bad = [i for i, b in enumerate(blobs) if not b.startswith(PNG_SIGNATURE)]
            if bad:
                raise DatasetError(f"{where}: item {bad[0]} of the batch is not PNG data (no PNG signature)")
        if len(blobs) != len(labels):
            raise DatasetError(f"{where}: {len(blobs)} images but {len(labels)} labels")
        table = pa.table(
            {
                "image": pa.array(blobs, pa.binary()),
                "label": pa.array(labels.astype(np.int32), pa.int32()),
                "class_name": pa.array(self._class_array[labels].tolist(), pa.string()),
            },
            schema=self.schema,
        )
        self._writer.write_table(table)
        self.rows += len(blobs)

    def close(self) -> Path:
        self._writer.close()
        os.replace(self._tmp, self.path)  # atomic: readers never see a half-written file
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_dataset(
    path: str | os.PathLike,
    images: np.ndarray,
    labels: Sequence[int],
    classes: Sequence[str],
    *,
    encoding: str = "raw",
    name: str = "",
    source: str = "",
    class_splits: dict[str, Sequence[str]] | None = None,
) -> Path:
    """Writes uint8 images (N, C, H, W) or (N, H, W) with integer labels as a metaray Parquet dataset."""
    images = _as_chw(images, str(path))
    with DatasetWriter(
        path, classes=classes, shape=images.shape[1:], encoding=encoding, name=name, source=source, class_splits=class_splits
    ) as w:
        w.write(images, labels)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


class LabelledDataset:
    """A labelled image dataset backed by an Arrow table (memory-mapped from disk, or in memory).

    ``images(indices)`` returns uint8 (n, C, H, W) copies of just those rows; ``ds[i]`` returns
    (float tensor in [0, 1], int label), so the dataset is also a map-style torch ``Dataset`` (learn2learn's
    ``MetaDataset`` can wrap it). Pickles as its file path when it has one, so shipping it to a worker costs a
    few bytes and the worker maps the same file.
    """

    def __init__(
        self, table: pa.Table, info: DatasetInfo, *, where: str, path: Path | None = None, cache_dir: Path | None = None
    ):
        self.info = info
        self.where = where
        self.path = path
        self.cache_dir = cache_dir
        self._table = table
        self._setup()

    def _setup(self) -> None:
        table, info, where = self._table, self.info, self.where
        if table.num_rows == 0:
            raise DatasetError(f"{where}: dataset has no rows")
        if table.column("label").null_count:
            raise DatasetError(f"{where}: column label has {table.column('label').null_count} null rows; every row needs a class id")
        labels = table.column("label").to_numpy()
        n_cls = len(info.classes)
        if labels.min() < 0 or labels.max() >= n_cls:
            raise DatasetError(f"{where}: labels must lie in [0, {n_cls}) (the metaray.classes list), found {labels.min()}..{labels.max()}")
        # label <-> class_name must agree with the metadata class list.
        pairs = pa.table({"l": table.column("label"), "c": table.column("class_name")}).group_by(["l", "c"]).aggregate([])
        expected = np.array(info.classes, dtype=object)[pairs.column("l").to_numpy()]
        if not np.array_equal(expected, np.array(pairs.column("c").to_pylist(), dtype=object)):
            raise DatasetError(f"{where}: column class_name disagrees with metaray.classes[label]")
        self.labels = labels.astype(np.int64)
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], np.arange(n_cls + 1))
        self.class_indices: list[np.ndarray] = [order[bounds[c] : bounds[c + 1]] for c in range(n_cls)]
        self._column = table.column("image")
        self._raw: list[np.ndarray] = []  # "raw": one zero-copy (n, C, H, W) view per Arrow chunk
        if info.encoding == "raw":
            self._raw = [self._raw_view(chunk, start) for chunk, start in zip(self._column.chunks, self._chunk_starts())]
        self._starts = np.array(self._chunk_starts(), dtype=np.int64)

    def _chunk_starts(self) -> list[int]:
        return list(np.cumsum([0] + [len(c) for c in self._column.chunks])[:-1])

    def _raw_view(self, arr: pa.Array, start: int) -> np.ndarray:
        """A zero-copy view of one chunk's image bytes, checking every row has C*H*W bytes."""
        if arr.null_count:
            raise DatasetError(f"{self.where}: column image has {arr.null_count} null rows")
        nbytes = int(np.prod(self.info.shape))
        off_type = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        _, off_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(off_buf, dtype=off_type)[arr.offset : arr.offset + len(arr) + 1]
        sizes = np.diff(offsets)
        bad = np.flatnonzero(sizes != nbytes)
        if bad.size:
            i = int(bad[0]) + int(start)
            raise DatasetError(
                f"{self.where}: row {i} (class {self.info.classes[self.labels[i]]!r}): corrupt image: {int(sizes[bad[0]])} bytes, "
                f"raw images of shape {list(self.info.shape)} have {nbytes}"
            )
        if len(arr) == 0:
            return np.empty((0, *self.info.shape), dtype=np.uint8)
        data = np.frombuffer(data_buf, dtype=np.uint8)[int(offsets[0]) : int(offsets[-1])]
        return data.reshape(len(arr), *self.info.shape)

    # -- what users read --------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.shape

    @property
    def num_classes(self) -> int:
        return len(self.info.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """uint8 (n, C, H, W) copies of the given rows."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.where}: row indices must lie in [0, {len(self)})")
        if len(self._raw) == 1:
            return self._raw[0][idx]
        if self._raw:
            chunk = np.searchsorted(self._starts, idx, side="right") - 1
            out = np.empty((len(idx), *self.info.shape), dtype=np.uint8)
            for c in np.unique(chunk):
                sel = chunk == c
                out[sel] = self._raw[c][idx[sel] - self._starts[c]]
            return out
        out = np.empty((len(idx), *self.info.shape), dtype=np.uint8)
        for j, i in enumerate(idx):
            blob = self._column[int(i)].as_py()
            out[j] = decode_png(blob, self.info.shape, f"{self.where}: row {int(i)} (class {self.info.classes[self.labels[i]]!r})")
        return out

    def raw_view(self) -> np.ndarray | None:
        """The whole (N, C, H, W) uint8 array of a "raw" dataset as a read-only view of the Arrow buffers (for a
        memory-mapped dataset: of the mapped file, shared between processes; a copy if the file holds several
        record batches); None for "png"."""
        if len(self._raw) == 1:
            return self._raw[0]
        return np.concatenate(self._raw) if self._raw else None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.images([i])[0].copy()).float().div_(255.0)
        return img, int(self.labels[i])

    def class_counts(self) -> np.ndarray:
        return np.array([len(ix) for ix in self.class_indices])

    def __repr__(self) -> str:
        return (
            f"LabelledDataset({self.name or self.where!r}, {len(self)} samples, {self.num_classes} classes, "
            f"shape {list(self.shape)}, {self.info.encoding})"
        )

    def save(self, path: str | os.PathLike, *, encoding: str = "raw") -> Path:
        """Writes this dataset as a metaray Parquet file (e.g. after ``from_torch``)."""
        with DatasetWriter(
            path, classes=self.classes, shape=self.shape, encoding=encoding, name=self.name, source=self.info.source,
            class_splits=self.info.class_splits,
        ) as w:
            for start in range(0, len(self), 4096):
                rows = np.arange(start, min(start + 4096, len(self)))
                w.write(self.images(rows), self.labels[rows])
        return Path(path)

    # -- pickling: a file-backed dataset travels as its path ----------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        if self.path is not None:
            return {"path": str(self.path), "cache_dir": None if self.cache_dir is None else str(self.cache_dir)}
        return {"table": self._table, "info": self.info, "where": self.where}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "path" in state:
            other = open_dataset(state["path"], cache_dir=state["cache_dir"])
            self.__dict__.update(other.__dict__)
        else:
            self.__init__(state["table"], state["info"], where=state["where"])

    # -- building one in memory ------------------------------------------------------------------------------

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: Sequence[int],
        classes: Sequence[str] | None = None,
        *,
        name: str = "in-memory",
        source: str = "arrays",
        class_splits: dict[str, Sequence[str]] | None = None,
    ) -> "LabelledDataset":
        """An in-memory dataset from uint8 images (N, C, H, W) or (N, H, W) and integer labels."""
        images = _as_chw(images, name)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(images),):
            raise DatasetError(f"{name}: need one label per image, got {labels.shape} labels for {len(images)} images")
        if classes is None:
            classes = [str(c) for c in range(int(labels.max()) + 1)]
        classes = [str(c) for c in classes]
        splits = check_class_splits(dict(class_splits), classes, name) if class_splits is not None else None
        info = DatasetInfo(name, source, "raw", tuple(images.shape[1:]), tuple(classes), splits)
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DatasetError(f"{name}: labels must lie in [0, {len(classes)})")
        flat = np.ascontiguousarray(images).reshape(len(images), -1)
        table = pa.table(
            {
                "image": pa.array([r.tobytes() for r in flat], pa.binary()),
                "label": pa.array(labels.astype(np.int32)),
                "class_name": pa.array(np.array(classes, dtype=object)[labels].tolist(), pa.string()),
            }
        )
        return cls(table, info, where=name)

    @classmethod
    def from_torch(cls, dataset: Any, classes: Sequence[str] | None = None, *, name: str = "torch") -> "LabelledDataset":
        """Materializes a map-style torch dataset of (image, label) pairs, images as PIL images or [0, 1] tensors
        (e.g. a torchvision dataset). For small datasets; convert large ones to Parquet."""
        from PIL import Image

        imgs, labels = [], []
        for i in range(len(dataset)):
            img, label = dataset[i]
            if isinstance(img, Image.Image):
                arr = np.asarray(img.convert("L") if img.mode in ("1", "L", "P", "I", "F") else img.convert("RGB"))
                arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            elif isinstance(img, torch.Tensor) and img.is_floating_point():
                arr = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
                arr = arr[None] if arr.ndim == 2 else arr
            else:
                arr = np.asarray(img, dtype=np.uint8)
            imgs.append(arr)
            labels.append(int(label))
        shapes = {a.shape for a in imgs}
        if len(shapes) != 1:
            raise DatasetError(f"{name}: images have different shapes {sorted(shapes)[:3]}; resize them with a transform")
        if classes is None and hasattr(dataset, "classes") and len(dataset.classes) > max(labels):
            classes = list(dataset.classes)
        return cls.from_arrays(np.stack(imgs), labels, classes, name=name, source=f"torch dataset {type(dataset).__name__}")


def _cache_path(path: Path, cache_dir: Path | None) -> Path:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    digest = hashlib.blake2b(ident, digest_size=8).hexdigest()
    return (cache_dir or data_dir() / "arrow") / f"{path.stem}-{digest}.arrow"


@contextlib.contextmanager
def _reading(where: str) -> Iterator[None]:
    """pyarrow's errors on a damaged file (a bad page header, a page CRC mismatch, a non-UTF-8 name in the
    footer) as a DatasetError that names the file."""
    try:
        yield
    except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        first = str(e).strip().split("\n")[0][:300]
        raise DatasetError(f"{where}: corrupt or unreadable Parquet data ({type(e).__name__}: {first})") from None


def read_info(path: str | os.PathLike) -> DatasetInfo:
    """The metadata of a dataset file, validated, without reading its rows."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: dataset file does not exist")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return DatasetInfo.from_schema(schema, str(path))


def open_dataset(path: str | os.PathLike, *, memory_map: bool = True, cache_dir: str | os.PathLike | None = None) -> LabelledDataset:
    """Opens a metaray Parquet dataset (see the module docstring for the schema).

    memory_map=True (default): the rows are read from an uncompressed Arrow IPC copy of the file in
    ``cache_dir`` (default ``data_dir()/arrow``), built on first use and memory-mapped, so processes on one node
    share its pages. memory_map=False: the table is read into this process's memory.
    """
    path = Path(path)
    info = read_info(path)
    where = str(path)
    if not memory_map:
        with _reading(where):
            table = pq.read_table(path, page_checksum_verification=True)
        return LabelledDataset(table, info, where=where, path=None)
    cache = _cache_path(path, Path(cache_dir) if cache_dir is not None else None)
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        try:
            with _reading(where):
                # streamed batch by batch, so building the cache never holds the whole dataset in memory
                source = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
                schema = source.schema_arrow
                schema = schema.set(schema.get_field_index("image"), pa.field("image", pa.large_binary()))
                with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                    for batch in source.iter_batches(batch_size=CACHE_BATCH_ROWS):
                        writer.write_batch(batch.cast(schema))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, cache)
    # zero-copy: the table's buffers point into the mapping, which lives as long as they do
    table = pa.ipc.open_file(pa.memory_map(str(cache), "r")).read_all()
    return LabelledDataset(table, info, where=where, path=path.resolve(), cache_dir=Path(cache_dir).resolve() if cache_dir is not None else None)


def load(dataset: "LabelledDataset | str | os.PathLike") -> LabelledDataset:
    """A dataset object from a dataset or a Parquet path."""
    if isinstance(dataset, LabelledDataset):
        return dataset
    if isinstance(dataset, (str, os.PathLike)):
        return open_dataset(dataset)
    raise TypeError(f"expected a LabelledDataset or a path to a Parquet dataset, got {type(dataset).__name__}")


def iter_batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
