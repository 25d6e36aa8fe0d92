"""Steps/s of the Ray Train + DeepSpeed path against a plain torchrun DDP loop, one after the other.

Both train the same spec (model, inhibition, data, batch sizes, workers) for the same
number of steps; each side's figure is the median step time after the first fifth of the
steps, so start-up (Ray, DeepSpeed, process groups) is not counted.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memel.training import TrainSpec, run_training


@dataclass
class DdpComparison:
    memel_steps_per_s: float
    ddp_steps_per_s: float

    @property
    def ratio(self) -> float:
        return self.memel_steps_per_s / self.ddp_steps_per_s


def _memel_step_time(spec: TrainSpec) -> float:
    from mlflow import MlflowClient

    result = run_training(spec)
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "train/step_time_s")
    values = [m.value for m in sorted(history, key=lambda m: m.step)]
    return statistics.median(values[len(values) // 5 :])


def bench_ddp(spec: TrainSpec) -> DdpComparison:
    with tempfile.TemporaryDirectory(prefix="memel-bench-ddp-") as tmp:
        spec = spec.model_copy(update={"output_dir": str(Path(tmp) / "memel")})
        memel_step = _memel_step_time(spec)
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "ddp.json"
        spec_file.write_text(json.dumps(spec.model_dump(mode="json")))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={spec.train.workers}",
                "-m",
                "memel.benchmarks.ddp_loop",
                str(spec_file),
                str(out_file),
            ],
            check=True,
        )
        ddp_step = json.loads(out_file.read_text())["median_step_s"]
    return DdpComparison(1.0 / memel_step, 1.0 / ddp_step)
