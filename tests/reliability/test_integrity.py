"""Checksummed checkpoints: truncation, flipped bytes, wrong checksums and hostile pickles are refused with a
clear message; the previous good checkpoint is kept and found."""
from __future__ import annotations

import hashlib
import io
import json
import pathlib
import pickle
import subprocess
import sys

import pytest
import torch

from metaray.platform.integrity import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    CheckpointError,
    list_checkpoints,
    load_latest_good,
    read_checked,
    save_rotating,
    verify,
    write_atomic_checked,
)

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


def payload(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": {"w": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.randn(3, generator=g)},
        "step": seed,
        "rows": [{"loss": 0.5 * seed, "key": ["train", seed, 1]}],
        "optimizer": {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 1e-3}]},
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    else:
        assert a == b


def test_round_trip_tensors_and_bytes(tmp_path):
    p = write_atomic_checked(tmp_path / "a.pt", payload(3))
    assert_same(read_checked(p), payload(3))
    q = write_atomic_checked(tmp_path / "b.bin", b"\x00\xffraw")
    assert read_checked(q) == b"\x00\xffraw"
    assert p.read_bytes().startswith(MAGIC)
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temporary left behind


@pytest.mark.parametrize("cut", [0, 5, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 10, -1])
def test_truncated_file_is_refused(tmp_path, cut):
    p = write_atomic_checked(tmp_path / "c.pt", payload())
    data = p.read_bytes()
    p.write_bytes(data[:cut] if cut >= 0 else data[:-1])
    with pytest.raises(CheckpointError) as e:
        read_checked(p)
    msg = str(e.value)
    assert str(p) in msg
    assert ("truncated" in msg) or ("not a checksummed" in msg and cut == 0)


def test_every_flipped_payload_byte_is_detected(tmp_path):
    """Each single-byte flip anywhere in the payload or digest fails the checksum (sampled over the file)."""
    p = write_atomic_checked(tmp_path / "d.pt", payload())
    data = bytearray(p.read_bytes())
    positions = range(HEADER_SIZE - 32, len(data), max(1, len(data) // 97))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        p.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError, match="checksum mismatch"):
            read_checked(p)
    assert len(positions) > 50


def test_wrong_length_and_trailing_bytes_and_foreign_file(tmp_path):
    p = write_atomic_checked(tmp_path / "e.pt", payload())
    p.write_bytes(p.read_bytes() + b"junk")
    with pytest.raises(CheckpointError, match="trailing bytes"):
        read_checked(p)
    plain = tmp_path / "plain.pt"
    torch.save(payload(), plain)  # a checkpoint without a checksum header (e.g. from an older writer)
    with pytest.raises(CheckpointError, match="not a checksummed metaray checkpoint"):
        read_checked(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checked(tmp_path / "missing.pt")


class _Evil:
    """A pickle that creates a file when unpickled (calls pathlib.Path.touch)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.PurePosixPath(self.marker),))


def test_code_executing_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    # control: the payload really executes under plain pickle (so the test below means something)
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()

    buf = io.BytesIO()
    torch.save({"x": {"w": torch.zeros(2)}, "hook": _Evil(marker)}, buf)
    # an attacker who can write the file can also write a matching checksum: weights_only must hold anyway
    p = write_atomic_checked(tmp_path / "evil.pt", buf.getvalue())  # stored as bytes ...
    data = bytearray(p.read_bytes())
    data[len(MAGIC)] = ord("T")  # ... relabelled as a torch payload, digest still valid
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="refused: the checkpoint holds objects other than tensors"):
        read_checked(p)
    assert not marker.exists()

    # a bare pickle (not torch's zip format) behind a valid header: refused the same way
    evil = pickle.dumps({"hook": _Evil(marker)}, protocol=2)
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(MAGIC + HEADER.pack(b"T", len(evil), hashlib.sha256(evil).digest()) + evil)
    with pytest.raises(CheckpointError, match="refused"):
        read_checked(raw)
    assert not marker.exists()


def test_rotation_keeps_previous_good_and_resume_skips_bad(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_rotating(d, step, payload(step), keep=2)
    assert [p.name for p in list_checkpoints(d)] == ["ckpt_0000020.pt", "ckpt_0000030.pt"]
    assert json.loads((d / "latest.json").read_text()) == {"step": 30, "file": "ckpt_0000030.pt"}
    path, obj = load_latest_good(d)
    assert path.name == "ckpt_0000030.pt" and obj["step"] == 30

    # the newest one is damaged on disk: resuming falls back to the previous good one and says so
    newest = d / "ckpt_0000030.pt"
    newest.write_bytes(newest.read_bytes()[:-7])
    with pytest.warns(RuntimeWarning, match=r"ckpt_0000030.pt.*truncated.*resuming from ckpt_0000020.pt"):
        path, obj = load_latest_good(d)
    assert path.name == "ckpt_0000020.pt"
    assert_same(obj, payload(20))

    # writing a new one prunes the damaged file, never the last good one
    save_rotating(d, 40, payload(40), keep=2)
    assert [p.name for p in list_checkpoints(d)] == ["ckpt_0000020.pt", "ckpt_0000040.pt"]
    assert verify(d / "ckpt_0000020.pt") is None

    # everything damaged: a clear error listing each file
    for p in list_checkpoints(d):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint verifies.*ckpt_0000040.pt.*ckpt_0000020.pt"):
        load_latest_good(d)


def test_latest_pointer_cannot_escape_directory(tmp_path):
    d = tmp_path / "ck"
    save_rotating(d, 1, payload(1))
    outside = tmp_path / "ckpt_0000099.pt"
    write_atomic_checked(outside, payload(99))
    (d / "latest.json").write_text(json.dumps({"step": 99, "file": "../ckpt_0000099.pt"}))
    path, obj = load_latest_good(d)
    assert path == d / "ckpt_0000001.pt" and obj["step"] == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep must be an int >= 1"):
        save_rotating("/nonexistent", 1, {}, keep=0)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        save_rotating("/nonexistent", -1, {})


def test_killed_writer_leaves_old_file_intact(tmp_path):
    """A process killed while writing (SIGKILL mid-write) leaves the previous checkpoint readable."""
    target = tmp_path / "ckpt_0000001.pt"
    write_atomic_checked(target, payload(1))
    script = f"""
import os, signal, torch, builtins
from metaray.platform import integrity
real_write = integrity.os.fsync
def die(fd):  # the new bytes are in the temporary file; kill before the rename
    os.kill(os.getpid(), signal.SIGKILL)
integrity.os.fsync = die
integrity.write_atomic_checked({str(target)!r}, {{"x": torch.zeros(1000)}})
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert r.returncode == -9
    assert_same(read_checked(target), payload(1))


def test_platform_checkpoint_payload_round_trips(tmp_path):
    """What platform/checkpoint.py stores (RNG states incl. Python's tuple state, an Adam state_dict) goes through
    save_rotating / load_latest_good unchanged, and restoring the RNG reproduces the same draws."""
    import random

    import numpy as np

    from metaray.platform.checkpoint import rng_state, set_rng_state

    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    opt.step()
    payload = {"learner": {"x": {"w": p.detach().clone()}, "optimizer": opt.state_dict(), "step": 1}, "rng": rng_state()}
    expected = (torch.rand(2), random.random(), np.random.rand())
    save_rotating(tmp_path, 1, payload)
    _, back = load_latest_good(tmp_path)
    set_rng_state(back["rng"])
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
    opt2 = torch.optim.Adam([torch.nn.Parameter(back["learner"]["x"]["w"].clone())], lr=0.1)
    opt2.load_state_dict(back["learner"]["optimizer"])
    assert_same(opt2.state_dict()["state"], opt.state_dict()["state"])
