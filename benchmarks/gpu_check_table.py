"""The GPU check's one table, from the files ``benchmarks/gpu_check.sh`` leaves in its output dir.

Usage: python benchmarks/gpu_check_table.py OUT_DIR
Prints the table and writes ``OUT_DIR/results.json`` (every step's status and figures).
"""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

#: The L2E paper's measured MEmeL overhead at 70M is 9.7%; the targets on GPU (training step, pythia-70m).
TARGETS = {"rd": 0.03, "l2e": 0.01}
STEP_TITLES = {
    "setup": "setup",
    "tests": "gpu tests (pytest -m gpu)",
    "deepspeed": "DeepSpeed ZeRO-2 bf16, 1 process",
    "overhead-pythia-70m": "bench overhead pythia-70m",
    "kernels-eager": "bench inhibition, eager kernel",
    "overhead-pythia-160m": "bench overhead pythia-160m",
    "kernels-compiled": "bench inhibition, compiled kernel",
}


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tests(out: Path) -> str:
    try:
        root = ElementTree.parse(out / "tests.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return ""
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return ""
    total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    note = f"{total - failed - skipped} passed, {failed} failed, {skipped} skipped"
    reasons = {s.get("message", "") for s in root.iter("skipped")}
    return note + (f" ({'; '.join(sorted(reasons))[:120]})" if skipped else "")


def _deepspeed(result: dict[str, Any]) -> str:
    peak = f", peak {result['peak_memory_gib']:.1f} GiB" if result.get("peak_memory_gib") else ""
    return (
        f"{result['model']} {result['steps']} steps x {result['batch']}x{result['seq_len']} tok: "
        f"{result['steps_per_s']:.2f} steps/s, {result['tokens_per_s']:,.0f} tok/s, loss {result['first_loss']:.2f} -> "
        f"{result['final_loss']:.2f}, {result['inhibitors']} inhibitors, {result['inhibited_values']:,} values inhibited, "
        f"stats {result['stats_dtype']} {'finite' if result['stats_finite'] else 'NOT FINITE'}{peak}"
        f"{'' if result['ok'] else '  CHECK FAILED'}"
    )


def _overhead_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for row in result["rows"]:
        target = TARGETS.get(row["variant"])
        verdict = ""
        if target is not None and result.get("model") == "pythia-70m":
            verdict = f"  target <= {target:.0%}: {'met' if row['ratio'] - 1 <= target else 'NOT met'}"
        rows.append(
            (
                f"  {row['variant']}",
                f"step {row['step_ms']:.1f} ms, {row['ratio']:.3f}x none, module share {100 * row['module_share']:.2f}%{verdict}",
            )
        )
    return rows


def _kernel_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            f"  {row['kernel']} {row['layout']} top-{row['top_n']}",
            f"module {row['module_ms']:.3f} ms, h*1.0 {row['baseline_ms']:.3f} ms, median ratio {row['ratio']:.2f}x, "
            f"best/best {row['best_ratio']:.2f}x",
        )
        for row in result["rows"]
    ]


def table(out: Path) -> tuple[str, dict[str, Any]]:
    with open(out / "results.tsv", newline="") as file:
        steps = list(csv.DictReader(file, delimiter="\t"))
    env = _load(out / "environment.json") or {}
    lines: list[tuple[str, str, str, str]] = []
    summary: dict[str, Any] = {"environment": env, "steps": {}}
    for step in steps:
        name, status, seconds, note = step["step"], step["status"], step["seconds"], step["note"] or ""
        figures: Any = None
        detail: list[tuple[str, str]] = []
        if name == "setup":
            note = note.split("; environment.json")[0]
        elif name == "tests" and status != "SKIP":
            note = _tests(out) or note
        elif name == "deepspeed":
            figures = _load(out / "deepspeed.json")
            if figures:
                note = _deepspeed(figures)
        elif name.startswith("overhead-"):
            figures = _load(out / f"{name}.json")
            if figures:
                note, detail = figures["title"], _overhead_rows(figures)
        elif name.startswith("kernels-"):
            figures = _load(out / f"{name}.json")
            if figures:
                note, detail = figures["title"], _kernel_rows(figures)
                log = out / f"{name}.log"
                if log.is_file() and "compiled inhibition kernel failed" in log.read_text(errors="replace"):
                    note += "  COMPILE FAILED: these rows ran eager (see the log)"
        summary["steps"][name] = {"status": status, "seconds": int(seconds), "note": note, "figures": figures}
        lines.append((STEP_TITLES.get(name, name), status, seconds, note))
        lines += [(label, "", "", text) for label, text in detail]
        if name == "deepspeed":
            lines.append(
                (
                    "  Ray Train + DeepSpeed",
                    "not run",
                    "",
                    "Ray is not installed on the GPU machine; this run is DeepSpeed in one process",
                )
            )
    width = max(len(line[0]) for line in lines)
    header = (
        f"memel GPU check: {env.get('gpu') or 'no CUDA GPU'} | torch {env.get('torch', '?')} (CUDA {env.get('cuda')}) | "
        f"deepspeed {env.get('deepspeed', '?')} | python {env.get('python', '?')} | "
        f"{sum(int(s['seconds']) for s in steps)} s of steps"
    )
    text = [header, f"{'check':<{width}}  {'status':<7}  {'s':>4}  result"]
    text += [f"{check:<{width}}  {status:<7}  {seconds:>4}  {note}" for check, status, seconds, note in lines]
    return "\n".join(text), summary


def main() -> int:
    out = Path(sys.argv[1])
    text, summary = table(out)
    print(text)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
