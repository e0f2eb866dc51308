"""Ray Jobs for ``metaray submit``: submit once the cluster can take the job, follow it, say where results are.

Two things a user meets right after ``ray start --head`` are handled here:

- The dashboard answers before its job agent is up; until then a submission gets ``500: No available agent to
  submit job``. The submission is retried until the agent takes it, bounded by ``agent_timeout_s``, with one
  clear message on timeout. Nothing is created by a refused submission, so retrying with the same submission
  id is safe.
- The job runs in a temporary working directory on the cluster, so a relative ``run.output_dir`` puts the run
  directory there. ``metaray run`` prints ``RUN_DIR_MARKER <absolute path>`` in the job's log; after the job,
  ``submit`` reads that line back and prints the path and the node that holds it.

Token authentication stays on: the client sends ``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token``.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

RUN_DIR_MARKER = "metaray: run directory"
NO_AGENT = "No available agent"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """The cluster did not take the job (it never came up, or refused it): says what to check."""


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str                  # SUCCEEDED / FAILED / STOPPED, or PENDING/RUNNING with wait=False
    run_dir: str | None = None   # the absolute run directory the job printed, when known
    node: str | None = None      # the host of the job's driver node, which holds run_dir


def new_submission_id(config_name: str) -> str:
    """A readable, unique id: metaray-<config name>-<time>-<random>."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in config_name)[:32]
    return f"metaray-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _client(address: str, deadline: float, log: Callable[[str], None]):
    """A JobSubmissionClient, waiting (until the deadline) for a dashboard that does not answer yet."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    said = False
    while True:
        try:
            return JobSubmissionClient(address)
        except ConnectionError as e:
            if time.monotonic() > deadline:
                raise SubmitError(f"no Ray dashboard answers at {address} ({e}); start one with `ray start --head` "
                                  "or pass --address http://<head>:8265") from None
            if not said:
                log(f"waiting for the Ray dashboard at {address} ...")
                said = True
            time.sleep(1.0)


def submit_job(
    address: str,
    entrypoint: str,
    runtime_env: dict[str, Any],
    *,
    submission_id: str,
    agent_timeout_s: float = 120.0,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
):
    """Submits the job, retrying while the head's job agent is not up yet. Returns the client."""
    deadline = time.monotonic() + agent_timeout_s
    client = _client(address, deadline, log)
    delay, said = 1.0, False
    while True:
        try:
            client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
            return client
        except RuntimeError as e:
            if NO_AGENT not in str(e):
                raise SubmitError(f"the cluster at {address} refused the job: {e}") from None
            if time.monotonic() + delay > deadline:
                raise SubmitError(
                    f"the cluster at {address} has no job agent ready after {agent_timeout_s:.0f} s "
                    f"(the dashboard answers, but job submission needs the head node's dashboard agent). Check "
                    "`ray status` and the head's logs (dashboard_agent.log); wait longer with --agent-timeout"
                ) from None
            if not said:
                log("the head's job agent is not up yet; retrying until it takes the job ...")
                said = True
            sleep(delay)
            delay = min(2 * delay, 8.0)


def follow(client, job_id: str, *, out=sys.stdout) -> str:
    """Streams the job's log until it ends; returns its final status name."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 (a dropped log stream is not a failed job: fall back to polling)
        print(f"(log stream ended: {type(e).__name__}: {e}; polling the job status)", file=sys.stderr)
    while True:
        status = client.get_job_status(job_id).value
        if status in TERMINAL:
            return status
        time.sleep(1.0)


def run_dir_from_log(text: str) -> str | None:
    """The last run directory a ``metaray run`` printed into a log."""
    found = None
    for line in text.splitlines():
        if line.startswith(RUN_DIR_MARKER):
            found = line[len(RUN_DIR_MARKER):].strip()
    return found


def outcome(client, job_id: str, status: str) -> JobOutcome:
    """Where the job's results are: the run directory from its log and the host of its driver node."""
    try:
        logs = client.get_job_logs(job_id)
    except Exception:  # noqa: BLE001
        logs = ""
    node = None
    try:
        info = client.get_job_info(job_id)
        address = getattr(info, "driver_agent_http_address", None)
        node = urlparse(address).hostname if address else None
    except Exception:  # noqa: BLE001
        pass
    return JobOutcome(job_id, status, run_dir_from_log(logs), node)
