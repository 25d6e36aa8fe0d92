"""Step time of the Ray Train + DeepSpeed path against plain torchrun loops, side by side.

Three sides train the same spec (model, inhibition, data, batch sizes, workers, torch threads)
for the same number of steps, one after the other in this process: memel as ``memel train``
runs, with tracking, statistics, evaluation and snapshots on; a torchrun DDP loop; and a
torchrun loop of the DeepSpeed engine memel builds (same config and ZeRO stage), without Ray or
tracking. DDP over memel is the headline; DeepSpeed over memel is what memel and Ray cost
beside the engine they drive (at ZeRO-2 DeepSpeed itself reduces gradients at every
micro-batch and gathers the parameters after each step, which DDP does not). Each side records the
wall time of every optimizer step on rank 0 (from the end of the previous step, so what
memel does between steps counts), and both figures are taken over the same steps: every step
after the first fifth, so start-up (Ray, DeepSpeed, process groups, the first allocations)
is not counted. The median is the headline; the mean over the same steps also carries
memel's periodic logging, evaluation and snapshots, which the DDP loop does not do.

With ``ray_floor``, a fourth side runs the bare DeepSpeed loop again beside an idle embedded Ray
instance holding as many idle actors as a Ray Train run keeps beside its workers: the engine's
step under Ray's background alone (its GCS, raylet, dashboard and actors' event loops), with no
memel code. DeepSpeed over that is the share of the engine's speed any Ray Train run can keep
on the machine, the ceiling for the DS ratio; DDP over it is the ratio such a run would reach
if memel cost nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from memel.training import TrainSpec, run_training
from memel.training.callbacks import STEP_TIMES_ENV

#: The actors a Ray Train run keeps beside its workers: the controller, the placement-group
#: cleaner, the synchronization actor, the dataset manager, the autoscaling coordinator and the
#: preemption watcher.
TRAIN_HELPER_ACTORS = 6


@dataclass
class DdpRow:
    """One model and ZeRO stage: step times in ms over the same steps; memel's speed as a fraction
    of DDP's (DDP step time / memel step time) and of the bare DeepSpeed engine's."""

    model: str
    zero_stage: int
    steps: int
    memel_median_ms: float
    ddp_median_ms: float
    ratio: float
    memel_mean_ms: float
    ddp_mean_ms: float
    mean_ratio: float
    deepspeed_median_ms: float | None = None
    deepspeed_ratio: float | None = None
    beside_ray_median_ms: float | None = None
    ray_floor: float | None = None
    ceiling: float | None = None


def compare(
    model: str,
    zero_stage: int,
    memel: dict[str, list],
    ddp: dict[str, list],
    deepspeed: dict[str, list] | None = None,
    beside_ray: dict[str, list] | None = None,
) -> DdpRow:
    """A row from each side's ``{"steps": [...], "seconds": [...]}``, over the steps every side
    timed after the first fifth of the run (``beside_ray``: the DeepSpeed loop beside an idle Ray
    instance; only with ``deepspeed``)."""
    if beside_ray is not None and deepspeed is None:
        raise ValueError("the Ray floor is the DeepSpeed loop's; give its times too")
    given = (memel, ddp, deepspeed, beside_ray)
    sides = [dict(zip(side["steps"], side["seconds"])) for side in given if side is not None]
    last = max(max(side) for side in sides)
    steps = sorted(step for step in set.intersection(*(set(side) for side in sides)) if step > last // 5)
    if not steps:
        raise ValueError("the sides timed no common step after the first fifth of the run")
    ours, theirs = [sides[0][s] for s in steps], [sides[1][s] for s in steps]
    median_ours, median_theirs = statistics.median(ours), statistics.median(theirs)
    mean_ours, mean_theirs = statistics.fmean(ours), statistics.fmean(theirs)
    engine = statistics.median(sides[2][s] for s in steps) if deepspeed is not None else None
    floor = statistics.median(sides[3][s] for s in steps) if beside_ray is not None else None
    return DdpRow(
        model=model,
        zero_stage=zero_stage,
        steps=len(steps),
        memel_median_ms=1000 * median_ours,
        ddp_median_ms=1000 * median_theirs,
        ratio=median_theirs / median_ours,
        memel_mean_ms=1000 * mean_ours,
        ddp_mean_ms=1000 * mean_theirs,
        mean_ratio=mean_theirs / mean_ours,
        deepspeed_median_ms=None if engine is None else 1000 * engine,
        deepspeed_ratio=None if engine is None else engine / median_ours,
        beside_ray_median_ms=None if floor is None else 1000 * floor,
        ray_floor=None if floor is None or engine is None else engine / floor,
        ceiling=None if floor is None else median_theirs / floor,
    )


def _memel_times(spec: TrainSpec, folder: Path) -> dict[str, list]:
    import ray

    times_file = folder / "memel-steps.json"
    saved = os.environ.get(STEP_TIMES_ENV)
    os.environ[STEP_TIMES_ENV] = str(times_file)
    try:
        run_training(spec.model_copy(update={"output_dir": str(folder / "memel")}))
    finally:
        if saved is None:
            os.environ.pop(STEP_TIMES_ENV, None)
        else:
            os.environ[STEP_TIMES_ENV] = saved
        ray.shutdown()  # Ray's processes must not run beside the DDP side
    return json.loads(times_file.read_text())


def _ddp_times(spec: TrainSpec, folder: Path, engine: str = "ddp") -> dict[str, list]:
    """Step times of the torchrun loop (``ddp`` or ``deepspeed``, see :mod:`memel.benchmarks.ddp_loop`)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_file, times_file = folder / "spec.json", folder / f"{engine}-steps.json"
    spec_file.write_text(json.dumps(spec.model_dump(mode="json")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.train.workers}"]
    loop = [*command, "-m", "memel.benchmarks.ddp_loop", str(spec_file), str(times_file), engine]
    done = subprocess.run(loop, check=False)
    times = json.loads(times_file.read_text()) if times_file.is_file() else None
    if done.returncode != 0 and (times is None or max(times["steps"], default=0) < spec.train.steps):
        raise RuntimeError(
            f"the {engine} loop failed (exit status {done.returncode}) before it timed its {spec.train.steps} steps"
        )
    if done.returncode != 0:  # every step was timed; a rank died in teardown
        print(
            f"warning: the {engine} loop exited with status {done.returncode} after timing all its steps; "
            "its times are used"
        )
    return times


@contextlib.contextmanager
def idle_ray(actors: int = TRAIN_HELPER_ACTORS) -> Iterator[list[int]]:
    """An embedded Ray instance with ``actors`` idle actors (no CPU reserved), as a Ray Train run
    keeps beside its workers; yields the actors' process ids and shuts the instance down after."""
    import ray

    from memel.training.runner import start_embedded_ray

    start_embedded_ray(os.cpu_count() or 1)
    try:
        idle = ray.remote(num_cpus=0)(_IdleActor)
        handles = [idle.remote() for _ in range(actors)]
        yield ray.get([handle.pid.remote() for handle in handles])
    finally:
        ray.shutdown()


class _IdleActor:
    """An actor that only waits for tasks."""

    def pid(self) -> int:
        return os.getpid()


def bench_ddp(spec: TrainSpec, ray_floor: bool = False) -> DdpRow:
    """memel, then the DDP loop, then the bare DeepSpeed loop (and, with ``ray_floor``, the same loop
    beside an idle Ray instance), on ``spec``; their step times over the same steps."""
    with tempfile.TemporaryDirectory(prefix="memel-bench-ddp-") as tmp:
        memel = _memel_times(spec, Path(tmp))
        ddp = _ddp_times(spec, Path(tmp))
        deepspeed = _ddp_times(spec, Path(tmp), "deepspeed")
        beside_ray = None
        if ray_floor:
            with idle_ray():
                beside_ray = _ddp_times(spec, Path(tmp) / "beside-ray", "deepspeed")
    return compare(spec.model.name, spec.train.zero_stage, memel, ddp, deepspeed, beside_ray)
