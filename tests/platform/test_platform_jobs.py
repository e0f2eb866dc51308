"""`metaray submit`'s wait for the job agent, against a loopback HTTP server that answers like a Ray dashboard
whose agent is not up yet (the real head node is exercised end to end in test_platform_cli.py; there the agent's
start-up race cannot be produced on demand). Also the run-directory line the job log carries."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from metaray.platform import cli
from metaray.platform.jobs import RUN_DIR_MARKER, SubmitError, run_dir_from_log, submit_job


class Dashboard(BaseHTTPRequestHandler):
    """/api/version answers; POST /api/jobs/ answers 500 'No available agent' for the first ``refusals`` times."""

    refusals = 0
    posts: list = []

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def _reply(self, code: int, body: str, kind: str = "application/json"):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.startswith("/api/version"):
            self._reply(200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x", "session_name": "s"}))
        else:
            self._reply(404, "not found", "text/plain")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).posts.append(body)
        if len(type(self).posts) <= type(self).refusals:
            self._reply(500, "No available agent to submit job, please try again later.", "text/plain")
        else:
            self._reply(200, json.dumps({"submission_id": body["submission_id"], "job_id": None}))


@pytest.fixture
def dashboard():
    Dashboard.posts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_submit_retries_until_the_agent_takes_the_job(dashboard):
    Dashboard.refusals = 3
    logs, sleeps = [], []
    submit_job(dashboard, "python -m metaray.platform.cli run cfg.toml", {}, submission_id="metaray-t-1",
               agent_timeout_s=60, log=logs.append, sleep=sleeps.append)
    assert len(Dashboard.posts) == 4 and {p["submission_id"] for p in Dashboard.posts} == {"metaray-t-1"}
    assert sleeps == [1.0, 2.0, 4.0]  # bounded exponential backoff
    assert logs == ["the head's job agent is not up yet; retrying until it takes the job ..."]  # said once


def test_submit_gives_up_with_a_clear_message(dashboard):
    Dashboard.refusals = 10**6
    with pytest.raises(SubmitError, match=r"no job agent ready after 5 s .* --agent-timeout"):
        submit_job(dashboard, "true", {}, submission_id="metaray-t-2", agent_timeout_s=5, log=lambda m: None)
    assert 2 <= len(Dashboard.posts) <= 5


def test_other_refusals_are_not_retried(dashboard):
    class BadRequest(Dashboard):
        def do_POST(self):
            type(self).posts.append(1)
            self._reply(400, "invalid runtime_env", "text/plain")

    Dashboard.refusals = 0
    with pytest.raises(SubmitError, match="refused the job"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), BadRequest)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            submit_job(f"http://127.0.0.1:{server.server_address[1]}", "true", {}, submission_id="x", agent_timeout_s=60)
        finally:
            server.shutdown()
            server.server_close()


def test_no_dashboard_at_all_is_named():
    with pytest.raises(SubmitError, match="no Ray dashboard answers at http://127.0.0.1:9"):
        submit_job("http://127.0.0.1:9", "true", {}, submission_id="x", agent_timeout_s=1, log=lambda m: None)


def test_the_run_directory_line_is_found_in_a_job_log():
    log = f"starting\n{RUN_DIR_MARKER} /data/runs/a-1\nstep 1\n{RUN_DIR_MARKER} /data/runs/a-2\nmeta-test 0.5\n"
    assert run_dir_from_log(log) == "/data/runs/a-2"
    assert run_dir_from_log("nothing here") is None


def test_output_dir_must_be_absolute(tmp_path, capsys):
    (tmp_path / "cfg.toml").write_text('name = "t"\n[problem]\nname = "quadratic"\n[solver]\nname = "rad"\n')
    code = cli.main(["submit", str(tmp_path / "cfg.toml"), "--working-dir", str(tmp_path), "--output-dir", "runs"])
    assert code == 2 and "--output-dir must be an absolute path on the cluster" in capsys.readouterr().err
