"""Arrow/Parquet storage: round trips, the schema checks, corrupt data, and page sharing between processes."""
import io
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from metaray.tasks.storage import (
    FORMAT,
    DatasetError,
    DatasetWriter,
    LabelledDataset,
    open_dataset,
    read_info,
    write_dataset,
)


def small_images(n_classes=6, per_class=4, shape=(3, 10, 12), seed=0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n_classes * per_class, *shape), dtype=np.uint8)
    labels = np.repeat(np.arange(n_classes), per_class)
    return imgs, labels, [f"class-{i}" for i in range(n_classes)]


@pytest.mark.parametrize("encoding", ["raw", "png"])
@pytest.mark.parametrize("memory_map", [True, False])
def test_parquet_round_trip(tmp_path, encoding, memory_map):
    imgs, labels, classes = small_images()
    splits = {"train": classes[:3], "val": classes[3:4], "test": classes[4:]}
    path = write_dataset(tmp_path / "d.parquet", imgs, labels, classes, encoding=encoding, name="small", source="test", class_splits=splits)
    ds = open_dataset(path, memory_map=memory_map, cache_dir=tmp_path / "cache")
    assert len(ds) == len(imgs) and ds.classes == tuple(classes) and ds.shape == (3, 10, 12)
    assert ds.info.class_splits == splits and ds.name == "small" and ds.info.encoding == encoding
    order = np.arange(len(imgs))[::-1]
    np.testing.assert_array_equal(ds.images(order), imgs[order])  # PNG is lossless: bit-exact too
    np.testing.assert_array_equal(ds.labels, labels)
    assert [list(ix) for ix in ds.class_indices] == [list(range(4 * c, 4 * c + 4)) for c in range(6)]
    x, y = ds[5]
    assert y == 1 and str(x.dtype) == "torch.float32" and abs(float(x.max()) * 255 - imgs[5].max()) < 1e-3
    # the file is plain Parquet with the documented schema, readable by any Arrow tool
    table = pq.read_table(path)
    assert table.schema.names == ["image", "label", "class_name"]
    assert table.column("class_name").to_pylist()[5] == "class-1"
    assert table.schema.metadata[b"metaray.format"].decode() == FORMAT
    if encoding == "png":
        assert Image.open(io.BytesIO(table.column("image")[0].as_py())).format == "PNG"


def test_grayscale_and_streaming_writer(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(5, 7, 7), dtype=np.uint8)  # (N, H, W) grayscale
    b = rng.integers(0, 256, size=(3, 7, 7), dtype=np.uint8)
    with DatasetWriter(tmp_path / "g.parquet", classes=["x", "y"], shape=(1, 7, 7)) as w:
        w.write(a, [0] * 5)
        w.write(b, [1] * 3)
    ds = open_dataset(tmp_path / "g.parquet", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(ds.images(range(8))[:, 0], np.concatenate([a, b]))
    assert ds.class_counts().tolist() == [5, 3]


def test_file_backed_dataset_pickles_as_its_path(tmp_path):
    imgs, labels, classes = small_images()
    path = write_dataset(tmp_path / "d.parquet", imgs, labels, classes)
    ds = open_dataset(path, cache_dir=tmp_path / "cache")
    blob = pickle.dumps(ds)
    assert len(blob) < 1000 < imgs.nbytes
    back = pickle.loads(blob)
    np.testing.assert_array_equal(back.images([3, 7]), imgs[[3, 7]])
    mem = LabelledDataset.from_arrays(imgs, labels, classes)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(mem)).images([2]), imgs[[2]])


def test_wrong_schema_names_file_and_problem(tmp_path):
    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"img": pa.array([b"x"]), "label": pa.array([0], pa.int64())}), path)
    with pytest.raises(DatasetError) as e:
        open_dataset(path, cache_dir=tmp_path)
    msg = str(e.value)
    assert str(path) in msg and "missing column 'image'" in msg and "'label' has type int64" in msg and "class_name" in msg


def test_missing_and_non_parquet_files(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(tmp_path / "nope.parquet")
    bad = tmp_path / "text.parquet"
    bad.write_text("hello")
    with pytest.raises(DatasetError, match="not a readable Parquet file") as e:
        read_info(bad)
    assert str(bad) in str(e.value)


def test_corrupt_images_name_file_and_row(tmp_path):
    imgs, labels, classes = small_images()
    # PNG: one blob truncated -> error when that row is decoded, naming the file, row and class
    path = write_dataset(tmp_path / "p.parquet", imgs, labels, classes, encoding="png")
    t = pq.read_table(path)
    blobs = t.column("image").to_pylist()
    blobs[9] = blobs[9][:40]
    pq.write_table(t.set_column(0, "image", pa.array(blobs, pa.binary())), path)
    ds = open_dataset(path, cache_dir=tmp_path / "c")
    ds.images([0, 8])  # other rows are fine
    with pytest.raises(DatasetError) as e:
        ds.images([9])
    assert str(path) in str(e.value) and "row 9" in str(e.value) and "corrupt image" in str(e.value) and "class-2" in str(e.value)
    # raw: a row of the wrong length is caught when the file is opened
    path = write_dataset(tmp_path / "r.parquet", imgs, labels, classes)
    t = pq.read_table(path)
    blobs = t.column("image").to_pylist()
    blobs[4] = blobs[4][:-1]
    pq.write_table(t.set_column(0, "image", pa.array(blobs, pa.binary())), path)
    with pytest.raises(DatasetError, match=r"row 4 .*corrupt image: 359 bytes.*have 360"):
        open_dataset(path, cache_dir=tmp_path / "c")


def test_inconsistent_labels_and_bad_splits(tmp_path):
    imgs, labels, classes = small_images()
    path = write_dataset(tmp_path / "d.parquet", imgs, labels, classes)
    t = pq.read_table(path)
    names = t.column("class_name").to_pylist()
    names[0] = "class-5"
    pq.write_table(t.set_column(2, "class_name", pa.array(names)), path)
    with pytest.raises(DatasetError, match="class_name disagrees"):
        open_dataset(path, memory_map=False)
    with pytest.raises(DatasetError, match="in both splits"):
        write_dataset(tmp_path / "e.parquet", imgs, labels, classes, class_splits={"train": classes[:3], "test": classes[2:]})
    with pytest.raises(DatasetError, match=r"labels must be a 1-D array of class ids in \[0, 6\)"):
        write_dataset(tmp_path / "f.parquet", imgs, labels + 1, classes)


MMAP_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from metaray.tasks.storage import open_dataset

    def status():
        d = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Rss"))
        return {k: int(v.split()[0]) for k, v in d.items()}

    def mapping_pss(name):  # Pss (kB) of this process's mappings of the cached Arrow file
        total, current = 0, False
        for line in open("/proc/self/smaps"):
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                current = line.rstrip().endswith(name) or (len(head) >= 6 and head[-1].endswith(name))
            elif current and head[0] == "Pss:":
                total += int(head[1])
        return total

    open_dataset(sys.argv[3], cache_dir=sys.argv[2]).raw_view().sum()  # warm-up: lazy imports, allocator arenas
    before = status()
    ds = open_dataset(sys.argv[1], cache_dir=sys.argv[2])
    raw = ds.raw_view()
    checksum = int(raw.sum(dtype=np.uint64))          # touches every page of the images
    after = status()
    print(checksum, after["RssAnon"] - before["RssAnon"], after["RssFile"] - before["RssFile"], flush=True)
    sys.stdin.readline()                             # both processes hold the mapping now
    print(mapping_pss(".arrow"), flush=True)
    sys.stdin.readline()
    """
)


def test_memory_mapped_reader_shares_pages_between_processes(tmp_path):
    n, shape = 12_000, (1, 64, 64)  # 48 MiB of images
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    path = write_dataset(tmp_path / "big.parquet", imgs, np.arange(n) % 10, [str(i) for i in range(10)])
    open_dataset(path, cache_dir=tmp_path / "cache")  # builds the shared Arrow cache once
    tiny = write_dataset(tmp_path / "tiny.parquet", imgs[:20], np.arange(20) % 10, [str(i) for i in range(10)])
    open_dataset(tiny, cache_dir=tmp_path / "cache")
    size_kb = imgs.nbytes // 1024
    expected = int(imgs.sum(dtype=np.uint64))
    del imgs
    script = tmp_path / "child.py"
    script.write_text(MMAP_CHILD)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(path), str(tmp_path / "cache"), str(tiny)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        first = [p.stdout.readline().split() for p in procs]
        for p in procs:
            p.stdin.write("\n")
            p.stdin.flush()
        pss = [int(p.stdout.readline()) for p in procs]
        for p in procs:
            p.stdin.write("\n")
            p.stdin.flush()
    finally:
        for p in procs:
            p.wait(timeout=60)
    for checksum, anon_kb, file_kb in first:
        assert int(checksum) == expected
        assert int(anon_kb) < 0.05 * size_kb, "images were copied into private memory"
        assert int(file_kb) > 0.9 * size_kb, "images are not resident as file-backed (shared) pages"
    # the two processes share the pages: each is charged about half of them (proportional set size)
    assert all(0.4 * size_kb < p < 0.65 * size_kb for p in pss), (pss, size_kb)
    assert 0.9 * size_kb < sum(pss) < 1.2 * size_kb


def test_many_record_batches_and_chunk_boundaries(tmp_path, monkeypatch):
    import metaray.tasks.storage as storage

    monkeypatch.setattr(storage, "CACHE_BATCH_ROWS", 7)  # the Arrow cache gets 4 record batches of ≤ 7 rows
    imgs, labels, classes = small_images()
    path = write_dataset(tmp_path / "d.parquet", imgs, labels, classes)
    ds = open_dataset(path, cache_dir=tmp_path / "cache")
    assert ds._column.num_chunks == 4
    idx = np.array([23, 0, 6, 7, 13, 14, 20, 21, 6])
    np.testing.assert_array_equal(ds.images(idx), imgs[idx])
    np.testing.assert_array_equal(ds.raw_view(), imgs)
    with pytest.raises(IndexError, match=r"row indices must lie in \[0, 24\)"):
        ds.images([24])
    # a bad row in a later chunk is reported with its global row number
    t = pq.read_table(path)
    blobs = t.column("image").to_pylist()
    blobs[17] = blobs[17] + b"x"
    pq.write_table(t.set_column(0, "image", pa.array(blobs, pa.binary())), path)
    with pytest.raises(DatasetError, match=r"row 17 \(class 'class-4'\): corrupt image: 361 bytes"):
        open_dataset(path, cache_dir=tmp_path / "cache")
