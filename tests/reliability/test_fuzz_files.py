"""Bad-input fuzzing of files: Parquet datasets (tasks layer reader) and TOML experiment configs (platform loader).

Every case ends in a valid dataset whose pixels equal what was written / a valid config, or a DatasetError /
ConfigError naming the file or field; never a pyarrow/tomllib/PIL exception, never silently different data.
Counts are printed (``pytest -s``); the ``slow`` versions run many more cases.
"""
from __future__ import annotations

import io
import itertools
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaray.platform.config import ConfigError, ExperimentConfig, loads_config
from metaray.tasks.storage import DatasetError, encode_png, open_dataset, write_dataset

from faultkit import count  # noqa: E402  (fuzz case counter; conftest prints it per module)


@pytest.fixture(scope="module", autouse=True)
def remove_work_dir():
    yield
    shutil.rmtree(WORK, ignore_errors=True)


FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))

WORK = Path(tempfile.mkdtemp(prefix="metaray-fuzz-"))
_ids = itertools.count()

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(12, 1, 6, 5), dtype=np.uint8)
LABELS = np.arange(12) % 3
CLASSES = ["a", "b", "c"]


def _valid_file(encoding: str) -> bytes:
    p = WORK / f"valid-{encoding}.parquet"
    if not p.exists():
        write_dataset(p, IMAGES, LABELS, CLASSES, encoding=encoding, name="fuzz")
    return p.read_bytes()


def read_all(path: Path, memory_map: bool):
    ds = open_dataset(path, memory_map=memory_map, cache_dir=WORK / "cache")
    return ds, ds.images(np.arange(len(ds))), ds.labels


def check_dataset_file(data: bytes, memory_map: bool, what: str) -> str:
    """Reads a (possibly damaged) dataset file completely and classifies the outcome:

    "refused"   DatasetError naming the file (the goal)
    "identical" the exact images and labels that were written (the damage did not matter)
    "silent"    different pixels or labels without an error
    Anything else (another exception type, a wrong message) fails the test.
    """
    count(f"dataset files ({what})")
    path = WORK / f"case-{next(_ids)}.parquet"
    path.write_bytes(data)
    try:
        ds, images, labels = read_all(path, memory_map)
    except DatasetError as e:
        assert str(path) in str(e), str(e)
        return "refused"
    if images.shape == IMAGES.shape and labels.tolist() == LABELS.tolist() and np.array_equal(images, IMAGES):
        return "identical"
    return "silent"


@st.composite
def damaged_file(draw):
    encoding = draw(st.sampled_from(["raw", "png"]))
    data = bytearray(_valid_file(encoding))
    how = draw(st.sampled_from(["truncate", "flip", "garbage", "zero_run", "append"]))
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif how == "garbage":
        data = bytearray(draw(st.binary(max_size=2000)))
        if draw(st.booleans()):
            data = bytearray(b"PAR1") + data + bytearray(b"PAR1")
    elif how == "zero_run":
        i = draw(st.integers(0, len(data) - 1))
        n = draw(st.integers(1, 64))
        data[i : i + n] = bytes(len(data[i : i + n]))
    else:
        data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data), draw(st.booleans()), f"{how}/{encoding}"


def _damaged(case):
    data, mm, what = case
    outcome = check_dataset_file(data, mm, "damaged bytes")
    count(f"damaged bytes -> {outcome}")
    # any damage is refused with a DatasetError naming the file, or does not change what is read
    assert outcome in ("refused", "identical"), (what, outcome)


def _flip_in_image_page() -> bytes:
    data = bytearray(_valid_file("raw"))
    data[40] ^= 0x01  # inside the zstd-compressed image column's first data page
    return bytes(data)


def test_flipped_byte_in_image_page_is_detected():
    assert check_dataset_file(_flip_in_image_page(), False, "flip in page") == "refused"


@pytest.mark.xfail(strict=True, reason="KNOWN GAP (tasks/storage.py): PNG images are decoded by Pillow, which does not "
                   "check IDAT chunk CRCs: some flipped bytes decode to different pixels (470 of 23,970 single-byte "
                   "changes of one 6x5 image); a per-row checksum column would catch them")
def test_flipped_byte_inside_png_is_detected():
    from metaray.tasks.storage import decode_png

    b = bytearray(encode_png(IMAGES[0]))
    b[45] ^= 72
    try:
        img = decode_png(bytes(b), (1, 6, 5), "row 0")
    except DatasetError:
        return
    assert np.array_equal(img, IMAGES[0])


def test_damaged_column_name_is_a_dataset_error():
    data = _valid_file("raw")
    i = data.index(b"\nclass_name%")  # the schema element in the footer
    bad = data[: i + 1] + b"\xe3" + data[i + 2 :]
    assert check_dataset_file(bad, False, "column name") == "refused"


def test_null_labels_are_a_dataset_error():
    from metaray.tasks.storage import COLUMNS, DatasetInfo

    info = DatasetInfo("fuzz", "", "raw", (1, 6, 5), tuple(CLASSES), None)
    schema = pa.schema(list(COLUMNS.items()), metadata=info.metadata())
    table = pa.table({"image": pa.array([IMAGES[i].tobytes() for i in range(3)], pa.binary()),
                      "label": pa.array([0, None, 2], pa.int32()), "class_name": pa.array(["a", "b", "c"])}, schema=schema)
    path = WORK / f"nulls-{next(_ids)}.parquet"
    pq.write_table(table, path)
    with pytest.raises(DatasetError, match="label"):
        open_dataset(path, memory_map=False)


def test_damaged_page_header_is_a_dataset_error():
    data = bytearray(_valid_file("raw"))
    data[4] ^= 0x01  # the first page header
    assert check_dataset_file(bytes(data), False, "page header") == "refused"


@FAST
@given(damaged_file())
def test_fuzz_damaged_dataset_files(case):
    _damaged(case)


@pytest.mark.slow
@SLOW
@given(damaged_file())
def test_fuzz_damaged_dataset_files_slow(case):
    _damaged(case)


# ---- well-formed Parquet, wrong content -------------------------------------------------------------------

TYPES = [pa.binary(), pa.large_binary(), pa.int32(), pa.int64(), pa.string(), pa.float32(), pa.list_(pa.int8())]
META_KEYS = ["metaray.format", "metaray.encoding", "metaray.shape", "metaray.classes", "metaray.class_splits"]


def _sample_value(t: pa.DataType, draw):
    if t in (pa.binary(), pa.large_binary()):
        return draw(st.binary(max_size=40))
    if t in (pa.int32(), pa.int64()):
        return draw(st.integers(-5, 5))
    if t == pa.string():
        return draw(st.sampled_from(CLASSES + ["zz", ""]))
    if t == pa.float32():
        return draw(st.floats(-2, 2, width=32))
    return draw(st.lists(st.integers(-3, 3), max_size=3))


@st.composite
def wrong_schema_file(draw):
    n = draw(st.integers(0, 5))
    columns = {}
    names = draw(st.lists(st.sampled_from(["image", "label", "class_name", "extra"]), min_size=0, max_size=4, unique=True))
    for name in names:
        t = draw(st.sampled_from(TYPES))
        columns[name] = pa.array([_sample_value(t, draw) for _ in range(n)], t)
    md = {}
    for k in draw(st.lists(st.sampled_from(META_KEYS), max_size=5, unique=True)):
        md[k] = draw(st.sampled_from({
            "metaray.format": ["metaray.labelled/1", "metaray.labelled/2", ""],
            "metaray.encoding": ["raw", "png", "jpeg", ""],
            "metaray.shape": ["[1, 2, 2]", "[1, 6, 5]", "[0, 2, 2]", "[2, 2]", "x", "[1.5, 2, 2]", "{}"],
            "metaray.classes": ['["a", "b", "c"]', '["a", "a"]', "[]", "7", "not json", '[1, 2]'],
            "metaray.class_splits": ['{"train": ["a"], "test": ["b"]}', '{"train": ["a"], "val": ["a"]}', '{"x": []}', "[]", "{"],
        }[k]))
    table = pa.table(columns) if columns else pa.table({"other": pa.array([1] * n)})
    table = table.replace_schema_metadata(md)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue(), draw(st.booleans())


def _wrong_schema(case):
    data, mm = case
    count("wrong-schema Parquet")
    path = WORK / f"schema-{next(_ids)}.parquet"
    path.write_bytes(data)
    try:
        ds = open_dataset(path, memory_map=mm, cache_dir=WORK / "cache")
        ds.images(np.arange(len(ds)))
        [ds[i] for i in range(len(ds))]
    except DatasetError as e:
        assert str(path) in str(e)
        return
    count("wrong-schema Parquet -> accepted and readable")


@FAST
@given(wrong_schema_file())
def test_fuzz_wrong_schema_files(case):
    _wrong_schema(case)


@pytest.mark.slow
@SLOW
@given(wrong_schema_file())
def test_fuzz_wrong_schema_files_slow(case):
    _wrong_schema(case)


def _png_table(blobs: list[bytes]) -> bytes:
    from metaray.tasks.storage import COLUMNS, DatasetInfo

    info = DatasetInfo("fuzz", "", "png", (1, 6, 5), tuple(CLASSES), None)
    schema = pa.schema(list(COLUMNS.items()), metadata=info.metadata())
    labels = LABELS[: len(blobs)]
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(labels.astype(np.int32)),
                      "class_name": pa.array([CLASSES[i] for i in labels])}, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@st.composite
def corrupt_png(draw):
    good = [encode_png(im) for im in IMAGES[:4]]
    i = draw(st.integers(0, 3))
    how = draw(st.sampled_from(["garbage", "truncate", "flip", "wrong_shape", "rgb"]))
    b = bytearray(good[i])
    if how == "garbage":
        b = bytearray(draw(st.binary(max_size=100)))
    elif how == "truncate":
        b = b[: draw(st.integers(0, len(b) - 1))]
    elif how == "flip":
        j = draw(st.integers(8, len(b) - 1))  # keep the signature: the damage is inside the PNG
        b[j] ^= draw(st.integers(1, 255))
    elif how == "wrong_shape":
        b = bytearray(encode_png(np.zeros((1, 7, 5), np.uint8)))
    else:
        b = bytearray(encode_png(np.zeros((3, 6, 5), np.uint8)))  # RGB where the dataset declares 1 channel
    good[i] = bytes(b)
    return good, i, how


def _corrupt_png(case):
    blobs, i, how = case
    count("corrupt PNG images")
    path = WORK / f"png-{next(_ids)}.parquet"
    path.write_bytes(_png_table(blobs))
    ds = open_dataset(path, memory_map=False)
    try:
        img = ds.images([i])
    except DatasetError as e:
        assert str(path) in str(e) and f"row {i}" in str(e), str(e)
        return
    # decoded: then it must be the image written (an RGB PNG is converted to the declared gray; allowed), except
    # for the known gap pinned by test_flipped_byte_inside_png_is_detected (Pillow skips IDAT CRCs)
    if how != "rgb" and not np.array_equal(img[0], IMAGES[i]):
        assert how == "flip", f"{how}: corrupt PNG decoded to different pixels without an error"
        count("corrupt PNG images -> KNOWN GAP: flipped byte decoded to different pixels")
        return
    count("corrupt PNG images -> decoded identically")


@FAST
@given(corrupt_png())
def test_fuzz_corrupt_png_images(case):
    _corrupt_png(case)


@pytest.mark.slow
@SLOW
@given(corrupt_png())
def test_fuzz_corrupt_png_images_slow(case):
    _corrupt_png(case)


# ----------------------------------------------------------------------------------------------------------
# TOML configs
# ----------------------------------------------------------------------------------------------------------

SECTION_KEYS = {
    "problem": ["name", "shots", "ways", "hidden", "bogus"],
    "solver": ["name", "inner_steps", "inner_lr", "warm_start", "cg_steps", "innner_lr"],
    "tasks": ["meta_batch_size", "val_tasks", "test_tasks", "persistent", "batch"],
    "outer": ["optimizer", "lr", "momentum", "nesterov", "betas", "clip_norm", "schedule", "min_lr", "gamma"],
    "cluster": ["backend", "num_workers", "num_cpus_per_worker", "strategy", "aggregation", "trim_fraction",
                "step_timeout_s", "address", "max_restarts"],
    "run": ["steps", "seed", "dtype", "device", "output_dir", "run_dir", "checkpoint_every", "keep_checkpoints"],
    "bogus_section": ["x"],
}

TOML_CHARS = st.characters(blacklist_categories=("Cs",))  # any character, control characters included
toml_scalar = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from(["maml", "rad", "sinusoid", "adam", "sgd", "ray", "inprocess", "PACK", "float64", "cpu", "mean",
                     "../../etc", "", "x" * 3]),
    st.text(TOML_CHARS, max_size=8),
)
toml_value = st.one_of(toml_scalar, st.lists(st.floats(-1, 2), max_size=3), st.lists(st.text(TOML_CHARS, max_size=3), max_size=2))


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in v) + '"'
    return "[" + ", ".join(_toml(x) for x in v) + "]"


@st.composite
def toml_config(draw):
    lines = []
    if draw(st.booleans()):
        lines.append(f"name = {_toml(draw(st.sampled_from(['ok', 'a b', 'x/y', '', 'run-1'])))}")
    for section in draw(st.lists(st.sampled_from(list(SECTION_KEYS)), max_size=4, unique=True)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(SECTION_KEYS[section]), max_size=4, unique=True)):
            lines.append(f"{key} = {_toml(draw(toml_value))}")
    text = "\n".join(lines) + "\n"
    if draw(st.integers(0, 9)) == 0:  # a syntax error now and then
        text = text[: draw(st.integers(0, len(text)))] + draw(st.sampled_from(["[", "= =", '"', "\x00", "[[a]]\nb=1"]))
    return text


def _config(text: str) -> None:
    count("TOML configs")
    try:
        cfg = loads_config(text)
    except ConfigError as e:
        assert str(e) and "Traceback" not in str(e)
        count("TOML configs -> ConfigError")
        return
    count("TOML configs -> valid")
    assert isinstance(cfg, ExperimentConfig)
    # a valid config round-trips through its resolved TOML (compared as text: NaN != NaN in dicts)
    again = loads_config(cfg.to_toml())
    assert again.to_toml() == cfg.to_toml()
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in cfg.problem.options.values()), cfg.problem.options


@settings(FAST, max_examples=150)
@given(toml_config())
def test_fuzz_toml_configs(text):
    _config(text)


@pytest.mark.slow
@settings(SLOW, max_examples=4000)
@given(toml_config())
def test_fuzz_toml_configs_slow(text):
    _config(text)


def test_resolved_config_with_control_character_round_trips():
    for text in ("runs\\u001f", "a\\u0000b", "tab\\there", 'quote\\"s', "back\\\\slash", "del\\u007f", "ünï"):
        cfg = loads_config(f'[problem]\nname = "sinusoid"\n[run]\noutput_dir = "{text}"\n')
        assert loads_config(cfg.to_toml()).to_dict() == cfg.to_dict(), text


def test_nonfinite_problem_option_is_refused_at_load():
    with pytest.raises(ConfigError, match="shots"):
        loads_config('[problem]\nname = "sinusoid"\nshots = nan\n')
    with pytest.raises(ConfigError, match=r"'shots' of problem 'sinusoid' must be an integer .*got 2\.5"):
        loads_config('[problem]\nname = "sinusoid"\nshots = 2.5\n')
    with pytest.raises(ConfigError, match=r"'corruption' of problem 'hyper-cleaning' must be finite"):
        loads_config('[problem]\nname = "hyper-cleaning"\ncorruption = inf\n')
    assert loads_config('[problem]\nname = "hyper-cleaning"\ncorruption = 1\n').problem.options["corruption"] == 1


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"outer\.lr must be > 0, got -1"):
        loads_config("[outer]\nlr = -1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'stpes' in \[run\]; did you mean 'steps'\?"):
        loads_config("[run]\nstpes = 3\n")
    with pytest.raises(ConfigError, match=r"\[solver\] .*inner_lr"):
        loads_config('[solver]\nname = "maml"\ninner_lr = nan\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        loads_config("[run\n")
