"""After a failed run: the statistics its workers computed but never stored, named in a warning.

Rank 0 logs a summary of every statistics snapshot to MLflow (``inhibited/<module>`` at its
step) and hands the per-neuron tables to the Parquet sink, which retries failed writes in the
background. When the run fails, Ray Train kills the workers, and tables still waiting in a sink
(an output folder that stopped taking writes) are lost without a word from the worker. The driver
compares the two records: a step MLflow has and the statistics root lacks was not written.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

#: ``module=<name>/part-<step>.parquet`` at the end of a statistics file's path.
PART = re.compile(r"module=([^/]+)/part-(\d+)\.parquet$")


def written_steps(stats_root: str, run_id: str) -> dict[str, set[int]]:
    """The steps stored for ``run_id`` in ``stats_root``, by module."""
    import pyarrow.fs as pafs

    from memel.stats import resolve_root
    from memel.stats.stats_root import partition_value

    root = resolve_root(stats_root)
    selector = pafs.FileSelector(f"{root.base}/run_id={partition_value(run_id)}", recursive=True, allow_not_found=True)
    found: dict[str, set[int]] = {}
    for info in root.fs.get_file_info(selector):
        match = PART.search(info.path)
        if match:
            found.setdefault(unquote(match.group(1)), set()).add(int(match.group(2)))
    return found


def logged_steps(client: Any, run_id: str) -> dict[str, set[int]]:
    """The steps whose snapshot summary MLflow holds for ``run_id``, by module."""
    keys = [key for key in client.get_run(run_id).data.metrics if key.startswith("inhibited/")]
    return {
        key.removeprefix("inhibited/"): {metric.step for metric in client.get_metric_history(run_id, key)}
        for key in keys
    }


def describe_missing(run_id: str, missing: dict[str, set[int]]) -> str:
    """``run <id>, steps a-b (n steps), modules x, y``: what is missing, the first few modules named."""
    steps = sorted(set().union(*missing.values()))
    modules = sorted(missing)
    shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]} ({len(steps)} steps)"
    return f"run {run_id}, {span}, modules {shown}"


def warn_unwritten(stats_root: str | None, run_id: str | None, client: Any, cause: str) -> None:
    """Print a warning naming the statistics MLflow saw and the statistics root lacks (nothing
    when all are stored, or when either record cannot be read: the failure itself says why)."""
    if stats_root is None or run_id is None:
        return
    try:
        written = written_steps(stats_root, run_id)
        missing = {
            module: steps - written.get(module, set())
            for module, steps in logged_steps(client, run_id).items()
            if steps - written.get(module, set())
        }
    except Exception:  # noqa: BLE001 - a best-effort report beside the failure being raised
        return
    if missing:
        rows = sum(len(steps) for steps in missing.values())
        print(
            f"[memel] warning: statistics not written to {stats_root}: {describe_missing(run_id, missing)} "
            f"({rows} module-steps; the run failed before they were stored: {cause}); "
            "running the spec again trains the steps after its last checkpoint again and stores theirs",
            flush=True,
        )
