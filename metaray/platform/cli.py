"""The ``metaray`` command line.

    metaray run CONFIG.toml [--set outer.lr=0.01 ...]   train, validate, meta-test; writes a run directory
    metaray demo                                        the embedded default (local Ray cluster, offline data)
    metaray eval RUN_DIR [--tasks N]                     meta-test a run's final params
    metaray resume RUN_DIR                               continue a run from its newest checkpoint
    metaray solvers                                      solvers with their options and papers
    metaray datasets                                     problems and offline datasets
    metaray submit CONFIG.toml [--address URL]           a Ray job of `metaray run CONFIG.toml` (waits for the job agent)

Also runnable as ``python -m metaray.platform.cli``. Bad input prints one line saying what is wrong (exit 2).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .jobs import RUN_DIR_MARKER, SubmitError

DEMO_CONFIG = """\
# metaray demo: 5-way 1-shot classification on the offline glyph set (an Omniglot-style alphabet rendered from
# matplotlib's fonts, built on first use): meta-learned Conv4 features with a closed-form ridge-regression head
# (R2D2, Bertinetto et al. 2019), 2 Ray actors on a local cluster. The baseline adapts the same ridge head on the
# randomly initialized (not meta-learned) features.
name = "demo-glyphs-ridge"

[problem]
name = "fewshot-features"
dataset = "glyphs"
ways = 5
shots = 1
queries = 15
inner = "ridge"

[solver]
name = "ridge"

[tasks]
meta_batch_size = 8
val_tasks = 100
test_tasks = 600

[outer]
optimizer = "adam"
lr = 0.001

[cluster]
backend = "ray"
num_workers = 2
num_cpus_per_worker = 1.0

[run]
steps = 300
seed = 0
val_every = 100
checkpoint_every = 100
output_dir = "runs"
"""


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ValueError(f"--set takes KEY=VALUE (e.g. outer.lr=0.01), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return key.strip(), value


def _load(path: str, overrides: Sequence[str]):
    from .config import load_config

    return load_config(path, dict(_parse_override(o) for o in overrides))


def _print_result(result) -> None:
    s = result.metrics
    print(f"run directory: {Path(result.run_dir).resolve()}")
    if result.test is not None:
        print(f"meta-test  (meta-learned, {s['solver']}): {result.test}")
    if result.baseline is not None:
        print(f"baseline   (no meta-learning, same adaptation from the random init): {result.baseline}")
    if result.test is not None and result.baseline is not None:
        better = result.test.mean > result.baseline.mean if s["higher_is_better"] else result.test.mean < result.baseline.mean
        gap_clear = abs(result.test.mean - result.baseline.mean) > (result.test.ci95 or 0) + (result.baseline.ci95 or 0)
        verdict = "beats" if better else "does NOT beat"
        print(f"meta-learning {verdict} the baseline" + (" (confidence intervals do not overlap)" if better and gap_clear else ""))
    for p in s.get("plots", []):
        print(f"plot: {Path(result.run_dir) / p}")


# ----------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------


def cmd_run(args) -> int:
    from .launch import launch

    cfg = _load(args.config, args.set)
    if args.run_dir:
        cfg = cfg.replace(**{"run.run_dir": args.run_dir})
    _print_result(launch(cfg))
    return 0


def cmd_demo(args) -> int:
    from .config import loads_config
    from .launch import launch

    cfg = loads_config(DEMO_CONFIG)
    overrides = dict(_parse_override(o) for o in args.set)
    if args.steps is not None:
        overrides["run.steps"] = args.steps
    if overrides:
        cfg = cfg.replace(**overrides)
    print(f"metaray demo: {cfg.solver.name} on {cfg.problem.name}, {cfg.run.steps} outer steps, "
          f"{cfg.cluster.num_workers} {'Ray actors' if cfg.cluster.backend == 'ray' else 'in-process workers'}")
    _print_result(launch(cfg))
    return 0


def cmd_eval(args) -> int:
    from .launch import evaluate

    out = evaluate(args.run_dir, num_tasks=args.tasks, progress=not args.quiet)
    print(f"{args.run_dir} ({out['params']}): meta-test {out['result']}")
    return 0


def cmd_resume(args) -> int:
    from .launch import resume

    _print_result(resume(args.run_dir, steps=args.steps))
    return 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def cmd_solvers(args) -> int:
    from .. import solvers

    rows = []
    for name in solvers.names():
        cls = solvers.get(name)
        opts = ", ".join(f"{o['name']}={o['default']!r}" for o in cls.Options.describe())
        rows.append([name, opts, cls.paper])
    if args.json:
        print(json.dumps([{"name": r[0], "options": solvers.get(r[0]).Options.describe(), "paper": r[2]} for r in rows], indent=2, default=str))
    else:
        print(_table(rows, ["solver", "options (defaults)", "paper"]))
    return 0


def cmd_datasets(args) -> int:
    from .problems import describe_problems

    print(_table([[r["name"], r["description"]] for r in describe_problems()], ["problem", "description"]))
    try:
        from ..tasks import registry  # type: ignore[attr-defined]
    except ImportError:
        return 0
    described = registry.describe_datasets()
    rows = []
    for d in described:
        d = d if isinstance(d, dict) else vars(d)
        rows.append([str(d.get(k, "")) for k in ("name", "classes", "samples", "source")])
    if rows:
        print()
        print(_table(rows, ["dataset", "classes", "samples", "where the data comes from"]))
    return 0


@dataclass(frozen=True)
class JobRequest:
    """What ``metaray submit`` sends: the dashboard address, the entrypoint and the runtime env."""

    address: str
    entrypoint: list[str]
    runtime_env: dict
    submission_id: str
    output_dir: str  # where the run directory goes on the cluster (absolute, or relative to the job's working dir)


def submit_request(args) -> JobRequest:
    """Checks the submission here (config, paths, JSON) so nothing fails later on the cluster."""
    working_dir = Path(args.working_dir).resolve()
    config = Path(args.config).resolve()
    if not config.is_file():
        raise ValueError(f"config file {args.config!r} does not exist")
    try:
        config_rel = config.relative_to(working_dir)
    except ValueError:
        raise ValueError(f"the config {config} must be inside the working dir {working_dir} (it is uploaded with it)") from None
    overrides = list(args.set)
    if args.output_dir:
        if not Path(args.output_dir).is_absolute():
            raise ValueError(
                f"--output-dir must be an absolute path on the cluster, got {args.output_dir!r} (a relative one would "
                "land in the job's temporary working directory)"
            )
        overrides.append(f"run.output_dir={args.output_dir}")
    cfg = _load(str(config), overrides)  # fail here, not on the cluster
    runtime_env = {"working_dir": str(working_dir), "excludes": ["runs/", ".venv/", ".git/", "*.pt"]}
    if args.runtime_env_json:
        try:
            extra = json.loads(args.runtime_env_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"--runtime-env-json is not valid JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ValueError("--runtime-env-json must be a JSON object")
        runtime_env.update(extra)
        runtime_env["working_dir"] = str(working_dir)
    if args.agent_timeout <= 0:
        raise ValueError(f"--agent-timeout must be > 0 seconds, got {args.agent_timeout}")
    address = args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    entry = [args.python, "-m", "metaray.platform.cli", "run", str(config_rel)]
    for o in overrides:
        entry += ["--set", o]
    from .jobs import new_submission_id

    return JobRequest(address, entry, runtime_env, args.job_id or new_submission_id(cfg.name), cfg.run.output_dir)


def cmd_submit(args) -> int:
    from .jobs import follow, outcome, submit_job

    req = submit_request(args)
    print(f"$ metaray submit: job {req.submission_id} to {req.address}: {shlex.join(req.entrypoint)}", flush=True)
    client = submit_job(req.address, shlex.join(req.entrypoint), req.runtime_env, submission_id=req.submission_id,
                        agent_timeout_s=args.agent_timeout)
    print(f"job {req.submission_id} submitted", flush=True)
    where = (f"under {req.output_dir} on the job's driver node" if Path(req.output_dir).is_absolute() else
             f"under {req.output_dir}/ inside the job's temporary working directory on the cluster (pass --output-dir "
             "/abs/path to choose)")
    if args.no_wait:
        print(f"not waiting. Follow it with: ray job logs --follow {req.submission_id} --address {req.address}\n"
              f"the run directory goes {where}; the job's log names it on the line '{RUN_DIR_MARKER} ...'")
        return 0
    status = follow(client, req.submission_id)
    result = outcome(client, req.submission_id, status)
    print(f"job {req.submission_id} {status.lower()}")
    if result.run_dir:
        node = f" on node {result.node}" if result.node else ""
        print(f"results: {result.run_dir}{node}")
        print("  (the job's driver node holds them: copy them with rsync/scp from that node, or set --output-dir to a "
              "shared filesystem)")
    return 0 if status == "SUCCEEDED" else 1


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metaray", description="Ray-distributed gradient-based bilevel optimization.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run an experiment from a TOML config")
    r.add_argument("config")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.add_argument("--run-dir", help="exact run directory")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="the embedded default: few-shot glyph classification (ridge head) on a local Ray cluster, offline data")
    d.add_argument("--steps", type=int, help="outer steps (default from the embedded config)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--print-config", action="store_true", help="print the embedded config and exit")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("eval", help="meta-test a run's final params")
    e.add_argument("run_dir")
    e.add_argument("--tasks", type=int, help="test tasks (default: the run's tasks.test_tasks)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    rs = sub.add_parser("resume", help="continue a run from its newest checkpoint")
    rs.add_argument("run_dir")
    rs.add_argument("--steps", type=int, help="train to this many steps in total (default: the run's run.steps)")
    rs.set_defaults(func=cmd_resume)

    s = sub.add_parser("solvers", help="list solvers, their options and papers")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_solvers)

    ds = sub.add_parser("datasets", help="list problems and offline datasets")
    ds.set_defaults(func=cmd_datasets)

    sb = sub.add_parser("submit", help="submit `metaray run CONFIG` as a Ray job (token auth on)")
    sb.add_argument("config")
    sb.add_argument("--address", help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    sb.add_argument("--working-dir", default=".", help="directory uploaded with the job (must contain the config)")
    sb.add_argument("--runtime-env-json", help="extra runtime env (JSON), merged into the forwarded one")
    sb.add_argument("--python", default="python", help="python executable on the cluster (default: python)")
    sb.add_argument("--job-id", help="submission id")
    sb.add_argument("--no-wait", action="store_true", help="return after submitting")
    sb.add_argument("--output-dir", help="absolute path on the cluster for the run directory (sets run.output_dir)")
    sb.add_argument("--agent-timeout", type=float, default=120.0,
                    help="seconds to wait for the head's job agent to take the job (default 120)")
    sb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sb.set_defaults(func=cmd_submit)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "print_config", False):
        print(DEMO_CONFIG, end="")
        return 0
    from ..solvers.core import NonFiniteError
    from .config import ConfigError

    try:
        return args.func(args)
    except Exception:
        if os.environ.get("METARAY_DEBUG"):
            raise
        try:
            raise
        except NonFiniteError as e:
            print(f"metaray {args.command}: stopped: {e}", file=sys.stderr)
            return 1
        except (ConfigError, ValueError, TypeError, FileNotFoundError, FileExistsError, SubmitError) as e:
            print(f"metaray {args.command}: error: {e} (set METARAY_DEBUG=1 for the traceback)", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
