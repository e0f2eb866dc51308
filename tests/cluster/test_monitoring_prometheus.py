"""Monitoring end to end, against a real Prometheus: the setup Ray's docs give for the dashboard's metrics view.

A local loopback Ray cluster of our own (own temp dir, free ports, metrics reported every 0.5 s) starts with
``RAY_PROMETHEUS_HOST`` pointing at a Prometheus that is then started on the ``prometheus.yml`` Ray writes into
its session directory (``<temp dir>/session_latest/metrics/prometheus/prometheus.yml``, which scrapes the targets
of Ray's service-discovery file: every node's metrics export port, the dashboard's and the autoscaler's), with a
1 s scrape interval, on 127.0.0.1 only, with a temporary storage dir; it is stopped at the end.

A short ``metaray.launch`` on that cluster (2 Ray actors, one of them killed mid-run so the fault counters are
real) is then queried through Prometheus's HTTP API with every panel expression of ``grafana_dashboard.json``,
template variables substituted as Grafana does: each must return data carrying the run's tag. Nothing waits a
fixed time: every wait polls with a deadline and says what was missing.

Prometheus comes from ``tools/install_monitoring.sh`` (``make test`` runs it). Without it the tests skip, except
under CI (``CI=true``), where they fail.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable

import pyarrow.parquet as pq
import pytest
import ray
import yaml

import metaray
from metaray.cluster import DASHBOARD, WorkerPool
from metaray.cluster.metrics import SERIES
from metaray.cluster.ray_pool import _start_local_ray

from cluster_helpers import CrashOnceSource

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SCRAPE_S = 1  # Prometheus scrape interval in this test (Ray's file says 10 s)
WAIT_S = 90   # the longest any one wait may take on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path:
        return path
    why = "prometheus is not on PATH; `bash tools/install_monitoring.sh` installs it (`make test` runs it first)"
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}. CI=true: the monitoring tests must run, not skip")
    pytest.skip(why)


def _wait(what: str, probe: Callable[[], Any], timeout: float = WAIT_S, interval: float = 0.5, detail=lambda: "") -> Any:
    """Polls ``probe`` until it returns something truthy; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}. {detail()}")
        time.sleep(interval)


class Prometheus:
    """A Prometheus process on 127.0.0.1 and its HTTP API."""

    def __init__(self, binary: str, config: Path, workdir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config, self.workdir = config, workdir
        self.log_path = workdir / "prometheus.log"
        self.binary = binary
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=subprocess.STDOUT)
        _wait("Prometheus to be ready", self._ready, detail=self.log_tail)

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}. {self.log_tail()}")
        try:
            return urllib.request.urlopen(f"{self.url}/-/ready", timeout=5).status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self) -> str:
        try:
            return "prometheus log: " + self.log_path.read_text()[-2000:]
        except OSError:
            return ""

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=15) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:  # a bad query answers 400 with Prometheus's reason
            raise AssertionError(f"Prometheus rejected {path} {params}: {e.read().decode()[:500]}") from None
        assert body["status"] == "success", body
        return body["data"]

    def instant(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]


@pytest.fixture(scope="module")
def monitored():
    """Ray (loopback, own temp dir) + Prometheus on Ray's prometheus.yml; both stopped at the end."""
    binary = _prometheus_binary()
    assert not ray.is_initialized(), "another test left Ray connected; this module needs a cluster of its own"
    tmp = Path(tempfile.mkdtemp(prefix="mrprom", dir="/tmp"))  # short: Ray's socket paths live under it
    prom = Prometheus(binary, tmp / "prometheus.yml", tmp)
    metrics_port, dashboard_port = _free_port(), _free_port()
    # The dashboard reads RAY_PROMETHEUS_HOST when it starts (a child of ray.init): its metrics view and the Grafana
    # datasource it provisions then point at this Prometheus.
    saved = os.environ.get("RAY_PROMETHEUS_HOST")
    os.environ["RAY_PROMETHEUS_HOST"] = prom.url
    try:
        _start_local_ray(
            ray,
            num_cpus=3,
            _temp_dir=str(tmp / "ray"),
            include_dashboard=True,
            dashboard_port=dashboard_port,
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 500},
            runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}},  # workers import cluster_helpers
            log_to_driver=False,
        )
    finally:
        if saved is None:
            os.environ.pop("RAY_PROMETHEUS_HOST", None)
        else:
            os.environ["RAY_PROMETHEUS_HOST"] = saved
    try:
        session = tmp / "ray" / "session_latest"
        ray_yml = session / "metrics" / "prometheus" / "prometheus.yml"
        _wait(f"Ray to write {ray_yml}", ray_yml.is_file)
        config = yaml.safe_load(ray_yml.read_text())
        # Ray's own file, scrape targets unchanged (its file-based service discovery), only faster: a short test
        config["global"].update(scrape_interval=f"{SCRAPE_S}s", scrape_timeout=f"{SCRAPE_S}s", evaluation_interval=f"{SCRAPE_S}s")
        prom.config.write_text(yaml.safe_dump(config))
        [sd_file] = [f for c in config["scrape_configs"] for sd in c.get("file_sd_configs", []) for f in sd["files"]]
        node_target = f"127.0.0.1:{metrics_port}"

        def sd_targets() -> list[str]:
            try:
                return [t for group in json.loads(Path(sd_file).read_text()) for t in group["targets"]]
            except (OSError, ValueError):
                return []

        targets = _wait(f"Ray's service discovery file {sd_file} to list {node_target}",
                        lambda: node_target in sd_targets() and sd_targets())
        assert all(t.startswith("127.0.0.1:") for t in targets), f"Ray lists non-loopback scrape targets: {targets}"
        prom.start()
        yield {"prom": prom, "session": session, "metrics_port": metrics_port,
               "dashboard": f"http://127.0.0.1:{dashboard_port}", "node_target": node_target}
    finally:
        prom.stop()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow  # with its fixture: ~15 s of Ray and Prometheus start-up
def test_prometheus_scrapes_ray_and_the_dashboard_reads_it(monitored):
    prom: Prometheus = monitored["prom"]

    def node_up():
        active = prom.api("targets", state="active")["activeTargets"]
        return active if any(t["labels"].get("instance") == monitored["node_target"] and t["health"] == "up"
                             for t in active) else None

    active = _wait(f"Prometheus to scrape Ray's metrics export port {monitored['node_target']}", node_up,
                   detail=lambda: f"targets: {prom.api('targets')}")
    assert all(urllib.parse.urlsplit(t["scrapeUrl"]).hostname == "127.0.0.1" for t in active), active
    sys.path.insert(0, str(ROOT / "tests" / "reliability"))
    import faultkit

    assert faultkit.listening_addresses(prom.port) == {"127.0.0.1"}  # our Prometheus is loopback-only
    # The dashboard's metrics view: it asks RAY_PROMETHEUS_HOST (with the cluster's token, auth stays on)
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    req = urllib.request.Request(f"{monitored['dashboard']}/api/prometheus_health", headers=get_auth_headers_if_auth_enabled({}))
    health = _wait("the dashboard to answer /api/prometheus_health", lambda: _get_json(req))
    assert health.get("result") is True and "prometheus running" in health.get("msg", ""), health
    # ...and the Grafana datasource Ray provisions for the dashboard's panels is this Prometheus
    datasources = yaml.safe_load((monitored["session"] / "metrics" / "grafana" / "provisioning" / "datasources" / "default.yml").read_text())
    assert [d["url"] for d in datasources["datasources"]] == [prom.url]


def _get_json(req: urllib.request.Request) -> dict | None:
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Grafana's template variables
# ----------------------------------------------------------------------------------------------------------


def _grafana_regex_escape(value: str) -> str:
    # what Grafana's Prometheus datasource does to a multi-value variable's value inside =~"..." (the backslash
    # doubled because the regex sits in a PromQL string)
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def grafana_expr(expr: str, variables: dict[str, str], step_s: float, range_s: float) -> str:
    """``expr`` with Grafana's variables substituted: the dashboard's own (``$run``) and the built-in interval ones
    (``$__rate_interval`` = max(4 x scrape interval, step + scrape interval), as Grafana computes it)."""
    builtins = {
        "__interval": f"{int(step_s)}s",
        "__interval_ms": str(int(step_s * 1000)),
        "__rate_interval": f"{int(max(4 * SCRAPE_S, step_s + SCRAPE_S))}s",
        "__range": f"{int(range_s)}s",
        "__range_s": str(int(range_s)),
    }
    values = {**builtins, **{k: _grafana_regex_escape(v) for k, v in variables.items()}}

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise AssertionError(f"panel query uses template variable ${name}, which the dashboard does not define: {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", sub, expr)


def test_grafana_expr_substitutes_like_grafana():
    e = 'sum by (run) (rate(x{run=~"$run"}[$__rate_interval])) / ${run}'
    assert grafana_expr(e, {"run": "a.b"}, step_s=1, range_s=60) == r'sum by (run) (rate(x{run=~"a\\.b"}[4s])) / a\\.b'
    with pytest.raises(AssertionError, match=r"\$nope"):
        grafana_expr("x{a=~\"$nope\"}", {"run": "r"}, 1, 60)


# ----------------------------------------------------------------------------------------------------------
# Every panel on a real run
# ----------------------------------------------------------------------------------------------------------


def _prometheus_name(name: str, kind: str) -> str:
    return "ray_" + name + {"counter": "_total", "histogram": "_bucket"}.get(kind, "")


@pytest.mark.slow
def test_every_grafana_panel_returns_the_runs_data(monitored, tmp_path):
    prom: Prometheus = monitored["prom"]
    tag = f"prom-{uuid.uuid4().hex[:8]}"  # the run's `run` tag (the run directory's name)
    steps, batch, val_tasks, test_tasks = 8, 4, 4, 4
    cfg = metaray.load_config(ROOT / "examples" / "sinusoid_maml.toml").replace(**{
        "run.run_dir": str(tmp_path / tag), "run.steps": steps, "run.val_every": 4, "run.checkpoint_every": 0,
        "run.baseline": False, "run.plots": False, "run.progress": False,
        "tasks.meta_batch_size": batch, "tasks.val_tasks": val_tasks, "tasks.test_tasks": test_tasks,
        "cluster.backend": "ray", "cluster.num_workers": 2,
    })
    marker = tmp_path / "crashed-once"

    def pool_factory(spec, cluster_config, run_name):
        # worker 1 (the owner of task index 1) dies computing ('train', 4, 1): Ray restarts it, the pool re-dispatches
        spec = dataclasses.replace(spec, source=CrashOnceSource(spec.source, ("train", 4, 1), str(marker)),
                                   imports=(*spec.imports, "cluster_helpers"))
        return WorkerPool(spec, cluster_config, run_name)

    def steps_seen() -> float:
        result = prom.instant(f'ray_metaray_steps_total{{run="{tag}"}}')
        return float(result[0]["value"][1]) if result else 0.0

    def ours() -> str:
        return f"metaray series in Prometheus: {[s['metric'] for s in prom.instant('{__name__=~%r}' % 'ray_metaray_.*')]}"

    def on_step(row):
        # Hold the run until Prometheus has scraped its step counter once: the later steps then increase every
        # counter after a scrape, so rate() and histogram_quantile() have two samples to work with, whatever the load.
        if row["step"] == 2:
            _wait("Prometheus to scrape ray_metaray_steps_total >= 2 during the run", lambda: steps_seen() >= 2, detail=ours)

    started = time.time()
    result = metaray.launch(cfg, pool_factory=pool_factory, on_step=on_step)
    table = pq.read_table(result.run_dir / "metrics.parquet").to_pydict()
    restarts, retries = sum(table["restarts"]), sum(table["retries"])
    assert marker.exists() and restarts >= 1 and retries >= 1, (restarts, retries)  # the fault really happened

    # What the counters must say once Prometheus has the run's last values (tasks: training, 2 validations, test)
    finals = {
        "ray_metaray_steps_total": steps,
        "ray_metaray_tasks_total": steps * batch + 2 * val_tasks + test_tasks,
        "ray_metaray_restarts_total": restarts,
        "ray_metaray_retries_total": retries,
    }

    def last(name: str) -> float | None:
        r = prom.instant(f'{name}{{run="{tag}"}}')
        return float(r[0]["value"][1]) if r else None

    _wait("Prometheus to scrape the run's final counter values", lambda: all(last(n) == v for n, v in finals.items()),
          detail=lambda: f"expected {finals}, Prometheus has { {n: last(n) for n in finals} }")
    # Every series metaray exports (metrics.SERIES, whatever it lists now) exists in Prometheus with the run's tag
    for name, (kind, _, tags) in SERIES.items():
        series = prom.api("series", **{"match[]": f'{_prometheus_name(name, kind)}{{run="{tag}"}}', "start": started})
        assert series, f"{_prometheus_name(name, kind)} has no series with run={tag!r} in Prometheus"
        assert all(set(tags) <= set(s) for s in series), (name, tags, series)

    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    # The dashboard's `run` variable lists this run (Grafana's label_values(metric, label) is this API call)
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            assert m, f"templating variable {var['name']}: unsupported query {query!r}"
            values = prom.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)})
            assert tag in values, (var["name"], query, values)

    # Every panel's every query, as Grafana would send it (query_range over the run, step = scrape interval)
    end = time.time() + SCRAPE_S
    step = SCRAPE_S
    report = []
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no queries"
        for target in panel["targets"]:
            expr = grafana_expr(target["expr"], {"run": tag}, step_s=step, range_s=end - started)
            data = prom.api("query_range", query=expr, start=started - 5, end=end, step=step)
            assert data["resultType"] == "matrix", (panel["title"], expr, data)
            series = data["result"]
            where = f"panel {panel['title']!r} query {target['refId']} ({expr})"
            assert series, f"{where} returned no data for run {tag!r}"
            assert all(s["metric"].get("run") == tag for s in series), f"{where} returned series without run={tag!r}: {series}"
            samples = [float(v) for s in series for _, v in s["values"]]
            finite = [v for v in samples if math.isfinite(v)]
            assert finite, f"{where} returned only NaN/Inf: {series}"
            report.append((panel["title"], target["refId"], target.get("legendFormat", ""), len(series), len(samples), len(finite)))
    # The fault panel, both ways: 0 before the crash (Ray exports a counter only once it is incremented, so that is
    # the `or ... * 0` fallback; Prometheus scraped the run at step 2, before the crash at step 5), then the counters
    [fault_panel] = [p for p in dashboard["panels"] if "restarts_total" in json.dumps(p["targets"])]
    for target in fault_panel["targets"]:
        counter = "ray_metaray_restarts_total" if "restarts_total" in target["expr"] else "ray_metaray_retries_total"
        expr = grafana_expr(target["expr"], {"run": tag}, step_s=step, range_s=end - started)
        [series] = prom.api("query_range", query=expr, start=started - 5, end=end, step=step)["result"]
        values = [float(v) for _, v in series["values"]]
        assert values[0] == 0 and values[-1] == finals[counter], (expr, values)

    print(f"\nGrafana panels against Prometheus, run {tag} ({steps} steps, {restarts} restart(s), {retries} retries):")
    for title, ref, legend, n_series, n_samples, n_finite in report:
        print(f"  {title} [{ref}] {legend!r}: {n_series} series, {n_samples} samples ({n_finite} finite)")
