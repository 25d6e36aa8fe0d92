"""The run record: every name memel writes for a run and reads back later, in one place.

Output folders hold ``run.json`` (run name, MLflow run id, redacted tracking URI), ``spec.json``
(the redacted spec that analysis rebuilds the model from) and ``summary.json`` (where the
results are); a sweep's folder holds ``sweep.json``, a study's ``trials.csv``. A checkpoint
holds DeepSpeed's shards plus memel's own state in its ``memel/`` folder. MLflow runs carry
``memel.*`` tags. These names are on disk and in tracking servers already: change none of them.
"""

from __future__ import annotations

from pathlib import Path

# Files in a run's output folder (and, for spec and summary, MLflow artifacts of the run).
RUN_FILE = "run.json"
SPEC_FILE = "spec.json"
SUMMARY_FILE = "summary.json"
DEEPSPEED_CONFIG_FILE = "deepspeed_config.json"

# A sweep's and a study's output folder (and their parent run's MLflow artifacts).
SWEEP_FILE = "sweep.json"
STUDY_FILE = "study.json"
MEMBERS_DIR = "members"
TRIALS_DIR = "trials"
JOB_FILE = "job.json"
SWEEP_TABLE_CSV = "sweep_table.csv"
SWEEP_TABLE_JSON = "sweep_table.json"
SWEEP_SUMMARY_FILE = "sweep_summary.json"
TRIALS_FILE = "trials.csv"
STUDY_SUMMARY_FILE = "study_summary.json"

# Inside a checkpoint: memel's own state beside DeepSpeed's shards.
CHECKPOINT_STATE_DIR = "memel"
PROGRESS_FILE = "progress.json"
INHIBITION_FILE = "inhibition.pt"
REPORT_FILE = "report.json"  # the metrics reported with the checkpoint (what a rerun returns if it is the last)


def checkpoint_tag(step: int) -> str:
    """DeepSpeed's tag of the checkpoint taken at ``step``."""
    return f"step-{step:09d}"


def loader_file(rank: int) -> str:
    """The data position of ``rank`` in a checkpoint."""
    return f"loader-rank{rank}.json"


def rng_file(rank: int) -> str:
    """The torch RNG state of ``rank`` in a checkpoint."""
    return f"rng-rank{rank}.pt"


def checkpoint_state(checkpoint: Path) -> Path:
    """The folder of memel's own state in a checkpoint."""
    return Path(checkpoint) / CHECKPOINT_STATE_DIR


def progress_path(checkpoint: Path) -> Path:
    """A checkpoint's progress file (step, tokens seen, run id, DeepSpeed tag)."""
    return checkpoint_state(checkpoint) / PROGRESS_FILE


def report_path(checkpoint: Path) -> Path:
    """The metrics reported to Ray Train with a checkpoint."""
    return checkpoint_state(checkpoint) / REPORT_FILE


def inhibition_path(checkpoint: Path) -> Path:
    """A checkpoint's Inhibitor states (buffers by module name)."""
    return checkpoint_state(checkpoint) / INHIBITION_FILE


def inhibition_shard_path(checkpoint: Path, rank: int) -> Path:
    """A checkpoint's Inhibitor states of ``rank`` where their statistics are sharded across ranks."""
    return checkpoint_state(checkpoint) / f"inhibition-rank{rank}.pt"


# Run kinds (the ``memel.kind`` tag).
KIND_SWEEP = "sweep"
KIND_SWEEP_MEMBER = "sweep-member"
KIND_STUDY = "study"
KIND_TRIAL = "trial"

# MLflow tags of a training run.
TAG_MODEL = "memel.model"
TAG_RUNG = "memel.rung"
TAG_N_PARAMS = "memel.n_params"
TAG_MODE = "memel.mode"
TAG_STRENGTH = "memel.strength"
TAG_TOP_N = "memel.top_n"
TAG_SEED = "memel.seed"
TAG_SELECT = "memel.select"
TAG_LAYOUT = "memel.layout"
TAG_PRESET = "memel.preset"
TAG_GIT_COMMIT = "memel.git_commit"
TAG_RUN_NAME = "memel.run_name"
TAG_PRUNED = "memel.pruned"

# MLflow tags of sweeps, studies and their members.
TAG_KIND = "memel.kind"
TAG_SWEEP = "memel.sweep"
TAG_MEMBERS = "memel.members"
TAG_RUNGS = "memel.rungs"
TAG_MODES = "memel.modes"
TAG_MEMBER = "memel.member"
TAG_VARIANT = "memel.variant"
TAG_STUDY = "memel.study"
TAG_TRIAL = "memel.trial"
TAG_OPTUNA_STORAGE = "memel.optuna_storage"
TAG_BEST_TRIAL = "memel.best_trial"
TAG_BEST_PARAMS = "memel.best_params"

# Optuna user attributes of a study's trials.
ATTR_MEMBER = "memel.member"
ATTR_INTERRUPTED = "memel.interrupted"
ATTR_MLFLOW_RUN_ID = "mlflow_run_id"
