"""Shared plumbing of the benchmark scripts: the section format ``run_all.py`` renders, plots, errors.

Every benchmark script writes one *section* as JSON (``--json PATH``) and its plots as PNG (``--img-dir``):

    {"title": str, "intro": str, "tables": [{"caption", "columns", "rows"}], "plots": [{"file", "caption"}],
     "notes": [str], "data": {...raw numbers...}}

``file`` is the PNG's name inside the image directory. Only measured numbers go in; a part that could not run
says "not run: <reason>" in its table or note.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's metaray
    sys.path.insert(0, str(ROOT))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rel_err(g: Any, ref: Any) -> float:
    """‖g − g_ref‖ / ‖g_ref‖ over all entries (one global norm; NOTES.md: per-tensor errors mislead)."""
    import torch

    if isinstance(g, dict):
        num = sum(float((g[k].double() - ref[k].double()).pow(2).sum()) for k in ref)
        den = sum(float(ref[k].double().pow(2).sum()) for k in ref)
    else:
        num = float((torch.as_tensor(g).double() - torch.as_tensor(ref).double()).pow(2).sum())
        den = float(torch.as_tensor(ref).double().pow(2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-2:
            return f"{v:.{digits}e}"
        return f"{v:.{digits + 1}g}"
    return str(v)


def table(caption: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> dict:
    return {"caption": caption, "columns": list(columns), "rows": [[fmt(c) for c in r] for r in rows]}


def attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """(fn(), None), or (None, "not run: <error>") — one failing part must not sink the others."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 — reported in the page, never swallowed silently
        return None, f"not run: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def line_plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str, ylabel: str,
              title: str, logx: bool = True, logy: bool = True) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    styles = ["-", "--", ":", "-."]
    for i, (label, (xs, ys)) in enumerate(series.items()):
        pts = [(a, b) for a, b in zip(xs, ys) if b is not None and math.isfinite(b) and (b > 0 or not logy)]
        if pts:  # colour and line style both cycle, so more than ten series stay distinguishable
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^D"[i // 10 % 4], ms=3, ls=styles[i // 10 % 4],
                    color=f"C{i % 10}", label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_section(path: str | os.PathLike | None, section: dict) -> None:
    text = json.dumps(section, indent=1, default=float)
    if path:
        Path(path).write_text(text)
    else:
        print(text)


def add_common_args(ap) -> None:
    ap.add_argument("--quick", action="store_true", help="small sizes (the run_all --quick pass)")
    ap.add_argument("--json", default=None, help="write the section JSON here (default: stdout)")
    ap.add_argument("--img-dir", default=str(ROOT / "docs" / "img"), help="where PNG plots go")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def section_main(doc: str, build: Callable[[bool, Path], dict], argv: list[str] | None = None) -> None:
    """The command line of a JSON benchmark whose ``build(quick, img_dir)`` takes no other arguments."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    write_section(args.json, build(args.quick, Path(args.img_dir)))
