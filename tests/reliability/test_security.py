"""Security defaults: Ray token auth on, dashboard and metrics on loopback, no unsafe deserialization anywhere in
metaray, config paths confined to the run directory."""
from __future__ import annotations

import ast
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import faultkit as K

PACKAGE = Path(__file__).resolve().parents[2] / "metaray"

# ----------------------------------------------------------------------------------------------------------
# Static scan: no unsafe deserialization in metaray/
# ----------------------------------------------------------------------------------------------------------

UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"), ("dill", "loads"),
    ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"), ("joblib", "load"),
    ("pd", "read_pickle"), ("pandas", "read_pickle"),
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Every call in ``source`` that could unpickle untrusted data: pickle-family loads, torch.load without a
    literal weights_only=True, numpy.load with allow_pickle=True, yaml.load without a safe loader, eval/exec."""
    found = []
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # from pickle import loads as l  ->  l: pickle.loads
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        name = aliases.get(name, name)
        parts = name.split(".")
        where = f"{filename}:{node.lineno}: {name}(...)"
        if len(parts) >= 2 and (parts[-2], parts[-1]) in UNSAFE_CALLS:
            found.append(where)
        elif name in ("torch.load", "torch.serialization.load"):
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(where + " without weights_only=True")
        elif name in ("np.load", "numpy.load"):
            ap = _kw(node, "allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True or (ap is not None and not isinstance(ap, ast.Constant)):
                found.append(where + " with allow_pickle")
        elif name == "yaml.load":
            loader = _kw(node, "Loader")
            if loader is None or "Safe" not in _dotted(loader):
                found.append(where + " without SafeLoader")
        elif name in ("eval", "exec"):
            found.append(where)
    return found


# Known, reported, not ours to edit: the CIFAR-100 converter unpickles the dataset's own pickle files (a swapped
# archive could run code). Fix there with a restricted Unpickler (dict/list/str/bytes + numpy array rebuild only).
KNOWN = {"metaray/tasks/convert.py: pickle.load": 1}
# Reviewed and allowed (not files): the actor unpickles the WorkerSpec its own driver pickled and passed as a Ray
# argument, a channel Ray already deserializes with cloudpickle for every call. Exactly this many occurrences.
ALLOWED = {"metaray/cluster/worker.py: pickle.loads": 1}


def _scan() -> list[str]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    return [p for f in files for p in unsafe_loads(f.read_text(), str(f.relative_to(PACKAGE.parent)))]


def _site(problem: str) -> str:
    path, _, rest = problem.partition(":")
    return f"{path}: {rest.split(': ', 1)[1].split('(')[0]}"


def _unexpected(problems: list[str], budget: dict[str, int]) -> list[str]:
    left, out = dict(budget), []
    for p in problems:
        if left.get(_site(p), 0) > 0:
            left[_site(p)] -= 1
        else:
            out.append(p)
    return out


def test_no_unsafe_deserialization_in_metaray():
    problems = _unexpected(_scan(), {**KNOWN, **ALLOWED})
    assert problems == [], "\n".join(problems)


@pytest.mark.xfail(strict=True, reason="KNOWN GAP (tasks/convert.py): _unpickle uses plain pickle.load on CIFAR-100 files")
def test_no_known_exceptions_left():
    assert [p for p in _scan() if _site(p) in KNOWN] == []


def test_the_scanner_finds_what_it_should():
    bad = """
import pickle, torch, yaml
import numpy as np
from pickle import loads as l
pickle.load(open('f', 'rb'))
l(b'')
torch.load('x')
torch.load('x', weights_only=False)
torch.load('x', weights_only=flag)
np.load('a.npy', allow_pickle=True)
yaml.load(s)
eval('1')
"""
    good = """
import torch, yaml, pickle
import numpy as np
torch.load('x', map_location='cpu', weights_only=True)
np.load('a.npy')
yaml.load(s, Loader=yaml.SafeLoader)
pickle.dumps(1)
"""
    assert len(unsafe_loads(bad)) == 8
    assert unsafe_loads(good) == []


# ----------------------------------------------------------------------------------------------------------
# Ray defaults of a local cluster started by metaray.cluster.init_ray
# ----------------------------------------------------------------------------------------------------------


def _node(ray):
    return ray._private.worker.global_worker.node


def _get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_ray_token_auth_is_on(ray_local):
    ray = ray_local
    token_file = Path(os.path.expanduser("~/.ray/auth_token"))
    assert token_file.is_file(), "Ray token auth should create ~/.ray/auth_token"
    url = "http://" + _node(ray).address_info["webui_url"] + "/api/version"
    assert _get(url) == 401  # no token: refused
    token = token_file.read_text().strip()
    assert _get(url, {"Authorization": f"Bearer {token}"}) == 200
    assert _get(url, {"Authorization": "Bearer " + "0" * len(token)}) in (401, 403)


def test_dashboard_binds_to_loopback(ray_local):
    host, port = _node(ray_local).address_info["webui_url"].rsplit(":", 1)
    assert host == "127.0.0.1"
    assert K.listening_addresses(int(port)) == {"127.0.0.1"}


@pytest.mark.xfail(strict=True, reason="KNOWN GAP: Ray's metrics exporter (ray_* Prometheus series, no token) binds "
                   "0.0.0.0 unless the node IP is a loopback address; metaray's init_ray does not change that")
def test_metrics_export_binds_to_loopback(ray_local):
    port = _node(ray_local).metrics_export_port
    addrs = K.listening_addresses(port)
    assert addrs, f"nothing listens on the metrics port {port}"
    assert addrs <= {"127.0.0.1", "::1"}, addrs


# ----------------------------------------------------------------------------------------------------------
# Config paths
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="KNOWN GAP (platform/config.py): run.run_dir accepts '..' components, so a "
                   "config can write its run directory (checkpoints, metrics) anywhere the user can write")
def test_run_dir_cannot_escape_the_output_dir():
    from metaray.platform.config import ConfigError, loads_config

    with pytest.raises(ConfigError, match="run_dir"):
        loads_config('[run]\noutput_dir = "runs"\nrun_dir = "../../../tmp/elsewhere"\n')
