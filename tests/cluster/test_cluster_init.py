"""metaray.cluster.init_ray: which cluster it joins or starts, and how a cluster it starts is exposed.

With no address it starts a fresh local cluster unless RAY_ADDRESS names one (``ray job submit`` sets it for the
job's driver); it never follows Ray's "latest cluster on this machine" file, which outlives dead clusters. A
local cluster it starts has node IP 127.0.0.1, so nothing of it (GCS, dashboard, metrics export) listens on
other interfaces.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import ray

from metaray.cluster import init_ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_init(monkeypatch):
    """ray.init replaced by a recorder (nothing starts): the calls, each with the value Ray's ENABLE_RAY_CLUSTER
    had during the call."""
    from ray._private import ray_constants

    calls = []

    def init(*args, **kwargs):
        calls.append((args, kwargs, ray_constants.ENABLE_RAY_CLUSTER))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


@pytest.mark.parametrize("address", [None, "local"])
def test_no_address_starts_a_local_loopback_cluster(fake_init, address):
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    assert init_ray(address) is True
    [(args, kwargs, enabled)] = fake_init
    assert args == ()
    assert kwargs == {"address": "local", "dashboard_host": "127.0.0.1", "_node_ip_address": "127.0.0.1"}
    assert enabled is False  # so Ray keeps 127.0.0.1 instead of swapping in the machine's routable IP
    assert ray_constants.ENABLE_RAY_CLUSTER == before  # and it is put back


def test_ray_address_from_ray_job_submit_is_joined(fake_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert init_ray(None) is True
    [(args, kwargs, _)] = fake_init
    # Ray reads RAY_ADDRESS itself; no node IP is forced on a cluster we only join
    assert args == () and kwargs.get("address") is None and "_node_ip_address" not in kwargs


def test_ray_address_local_still_starts_a_loopback_cluster(fake_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    init_ray(None)
    assert fake_init[0][1]["_node_ip_address"] == "127.0.0.1"


@pytest.mark.parametrize("address", ["auto", "10.1.2.3:6379", "ray://head:10001"])
def test_an_explicit_address_is_passed_as_given(fake_init, monkeypatch, address):
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")  # an explicit argument wins over it, as in ray.init
    assert init_ray(address) is True
    [(args, kwargs, _)] = fake_init
    assert kwargs == {"address": address, "dashboard_host": "127.0.0.1"}


def test_already_connected_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k))
    assert init_ray(None) is False and calls == []


STALE_SCRIPT = """
import json, sys, time
sys.path.insert(0, {root!r})
import ray
from metaray.cluster import init_ray
sys.path.insert(0, {kit!r})
import faultkit as K

t = time.time()
started = init_ray(None)
seconds = time.time() - t
node = ray._private.worker.global_worker.node
port = node.metrics_export_port
deadline = time.time() + 30
while not K.listening_addresses(port) and time.time() < deadline:
    time.sleep(0.2)
out = {{"started": started, "seconds": seconds, "gcs": node.address_info["gcs_address"], "ip": node.node_ip_address,
       "metrics": sorted(K.listening_addresses(port)), "head": node.head}}
ray.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_a_stale_current_cluster_file_is_not_followed():
    """Ray's own ray.init() with no address follows <tmp>/ray/ray_current_cluster, and retries a dead cluster's GCS
    for minutes. init_ray(None) with RAY_ADDRESS unset starts its own cluster at once (a subprocess with its own
    RAY_TMPDIR holding a file that points at a port nothing listens on)."""
    tmp = tempfile.mkdtemp(prefix="mr", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["RAY_TMPDIR"] = tmp
        script = STALE_SCRIPT.format(root=str(ROOT), kit=str(ROOT / "tests" / "reliability"))
        p = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                           timeout=180, cwd=str(ROOT))
        lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
        assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
        out = json.loads(lines[-1][len("RESULT "):])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert out["started"] is True and out["head"] is True  # a new cluster of its own, not a joined one
    assert out["gcs"] != "127.0.0.1:1" and out["gcs"].startswith("127.0.0.1:"), out
    assert out["ip"] == "127.0.0.1"
    assert out["metrics"] and set(out["metrics"]) <= {"127.0.0.1", "::1"}, out
