"""The architecture's dependency rule: solvers and tasks never import Ray or the platform."""
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_solvers_and_tasks_import_without_ray():
    code = "import sys, metaray.solvers, metaray.tasks; print('ray' in sys.modules, 'metaray.platform' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split()[-2:] == ["False", "False"]


def test_lower_layers_do_not_reference_upper_layers():
    pattern = re.compile(r"^\s*(import ray|from ray|from \.\.(cluster|platform)|import metaray\.(cluster|platform)|from metaray\.(cluster|platform))", re.M)
    offenders = []
    for layer in ("solvers", "tasks"):
        for path in (ROOT / "metaray" / layer).rglob("*.py"):
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"lower layers importing Ray or upper layers: {offenders}"
