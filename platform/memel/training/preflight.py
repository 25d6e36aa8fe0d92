"""Checks a training run passes before anything starts: what its workers would refuse, and what
the machine (or the cluster) it goes to can hold.

Spec checks (always): ``model.overrides`` are fields of the model's config; a text model's
``data.seq_len`` fits its context; ``train.deepspeed`` is a config DeepSpeed accepts and leaves
the batch sizes to ``train``.

State files (``run.json``, ``summary.json``, ``sweep.json``, ``study.json``) a resumed run
reads from its output folder are readable JSON objects.

Machine checks (the embedded default: no ``--address``, no RAY_ADDRESS): local data paths exist;
``train.workers x train.threads_per_worker`` is at most ``CPU_OVERSUBSCRIPTION`` threads per CPU
core; GPU workers have a GPU each; a CPU run's memory estimate (:func:`estimate_memory`) fits
in the machine's memory. Cluster checks (an address): after connecting, the cluster has the
CPUs (and GPUs) the workers ask for, waiting up to ``CLUSTER_WAIT_S`` for nodes to join.

Every failure is a :class:`~memel.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memel import run_record
from memel.errors import ConfigError, shown

from .runner import check_address_outputs
from .spec import TrainSpec

#: Worker threads allowed per CPU core on the embedded default (CPU-bound workers time-share).
CPU_OVERSUBSCRIPTION = 4
#: Memory one worker process takes before its model and batches (torch, Ray, DeepSpeed), bytes.
WORKER_OVERHEAD_BYTES = 512 * 2**20
#: Seconds to wait for a cluster to offer the resources a run asks for.
CLUSTER_WAIT_S = float(os.environ.get("MEMEL_CLUSTER_WAIT_S", "30"))
#: Batch sizes the spec's ``train`` section sets in the DeepSpeed config.
_BATCH_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size",
}


def embedded(address: str | None) -> bool:
    """The run goes to a local Ray started in this process (no address, no RAY_ADDRESS)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def model_config(spec: TrainSpec) -> Any:
    """The model's validated config with ``model.overrides`` applied."""
    from memel.models.ladder import get_config

    try:
        return get_config(spec.model.name, **spec.model.overrides)
    except ConfigError as error:
        raise ConfigError(f"model.overrides: {error}; see `memel models` for each model's fields") from None
    except TypeError as error:  # a non-string key
        raise ConfigError(f"model.overrides: {error}; give field: value pairs") from None


def _context(config: Any) -> tuple[str, int] | None:
    for field_name in ("context_length", "max_positions"):
        if hasattr(config, field_name):
            return field_name, int(getattr(config, field_name))
    return None


def check_sequence(spec: TrainSpec, config: Any) -> None:
    """A text model's ``data.seq_len`` is at most its context (the model refuses longer input)."""
    seq_len, context = spec.data.get("seq_len"), _context(config)
    if isinstance(seq_len, int) and context is not None and seq_len > context[1]:
        field_name, limit = context
        raise ConfigError(
            f"data.seq_len: {seq_len} exceeds the context of model {spec.model.name} ({field_name}={limit}); "
            f"use at most {limit}, or set model.overrides.{field_name}"
        )


def check_deepspeed(spec: TrainSpec) -> None:
    """``train.deepspeed`` merged into the generated config is one DeepSpeed accepts."""
    if not spec.train.deepspeed:
        return
    from .deepspeed_config import deepspeed_config

    merged = deepspeed_config(spec)
    generated = deepspeed_config(spec.model_copy(update={"train": spec.train.model_copy(update={"deepspeed": {}})}))
    for key, owner in _BATCH_KEYS.items():
        if merged.get(key) != generated[key]:
            raise ConfigError(
                f"train.deepspeed.{key}: {shown(merged.get(key))} disagrees with the spec's {generated[key]} "
                f"(from {owner}); leave it out of train.deepspeed and set {owner}"
            )
    one_worker = {
        **merged,
        "train_batch_size": merged["train_micro_batch_size_per_gpu"] * merged["gradient_accumulation_steps"],
    }
    try:
        import logging

        from deepspeed.runtime.config import DeepSpeedConfig

        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        DeepSpeedConfig(one_worker)
    except ImportError:
        return  # DeepSpeed is not installed here: the workers check it
    except Exception as error:  # noqa: BLE001 - DeepSpeed raises pydantic errors, AssertionError, ValueError, ...
        errors = getattr(error, "errors", None)
        if callable(errors):
            parts = [f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in errors()]
            detail = f"{getattr(error, 'title', 'config')}: {'; '.join(parts)}"
        else:
            detail = str(error) or type(error).__name__
        raise ConfigError(
            f"train.deepspeed: DeepSpeed refuses it ({detail}); see https://www.deepspeed.ai/docs/config-json/"
        ) from None


def _data_paths(data: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, path)`` of every local path the data section names."""
    found: list[tuple[str, str]] = []
    for field_name in ("path", "paths", "tokenizer"):
        value = data.get(field_name)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, str) or "://" in item or (field_name == "tokenizer" and item == "bytes"):
                continue
            found.append((f"data.{field_name}", item))
    return found


def check_data_paths(spec: TrainSpec) -> None:
    """Every local path of ``data`` exists on this machine (remote ``s3://`` paths are checked by the loader)."""
    for field_name, path in _data_paths(spec.data):
        if not Path(path).expanduser().exists():
            raise ConfigError(
                f"{field_name}: {shown(path)} does not exist on this machine; give an existing file or folder, or an s3:// URI"
            )


@dataclass(frozen=True)
class MemoryEstimate:
    """A rough estimate (bytes) of what a CPU run holds in memory, all workers together.

    ``parameters``: :func:`count_parameters`. ``model_state``: fp32 weights (4 bytes per
    parameter per worker), gradients (4) and AdamW's
    two moments (8): ZeRO stage 1 shards the moments across workers, stage 2 also the
    gradients, stage 3 also the weights. ``activations``: per worker, a transformer keeps
    about ``tokens x layers x (68 d_model + 10 heads x seq_len)`` bytes for the backward pass
    (Korthikanti et al. 2022, in fp32), plus ``tokens x vocab x 12`` for the logits, their
    softmax and gradient; other families count no activations. ``overhead``: one
    ``WORKER_OVERHEAD_BYTES`` per worker process.
    """

    parameters: int
    model_state: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.model_state + self.activations + self.overhead


def _tokens_per_sample(spec: TrainSpec, config: Any) -> int | None:
    if isinstance(spec.data.get("seq_len"), int):
        return int(spec.data["seq_len"])
    if hasattr(config, "patch_size") and hasattr(config, "image_size"):
        return (int(config.image_size) // max(1, int(config.patch_size))) ** 2 + 1
    return None


def count_parameters(spec: TrainSpec, config: Any) -> int:
    """Parameters of the spec's model: for a transformer ``4 d^2 + 2 d d_ff`` per layer plus the
    token and position embeddings and a decoder's output layer (within 10% of the exact count,
    without torch); other families are built on the meta device and counted."""
    layers, width = getattr(config, "n_layers", None), getattr(config, "d_model", None)
    if layers and width:
        d_ff = getattr(config, "d_ff", None) or int(width * getattr(config, "mlp_ratio", 4))
        positions = (
            getattr(config, "max_positions", 0)
            or (int(getattr(config, "image_size", 0)) // max(1, int(getattr(config, "patch_size", 1)))) ** 2
        )
        vocab = int(getattr(config, "vocab_size", 0))
        head = vocab if hasattr(config, "context_length") else 0  # a decoder's untied output layer
        embeddings = (vocab + int(positions) + head) * width
        return int(layers) * (4 * width * width + 2 * width * d_ff) + embeddings
    from memel.models import count_parameters as count_built

    return count_built(spec.model.name, **spec.model.overrides)


def estimate_memory(spec: TrainSpec, config: Any) -> MemoryEstimate:
    """What a CPU run of ``spec`` holds in memory (see :class:`MemoryEstimate`)."""
    workers, stage, train = spec.train.workers, spec.train.zero_stage, spec.train
    parameters = count_parameters(spec, config)
    weights = 4 * parameters * (1 if stage >= 3 else workers)
    gradients = 4 * parameters * (1 if stage >= 2 else workers)
    moments = 8 * parameters * (1 if stage >= 1 else workers)
    activations = 0
    seq_len = _tokens_per_sample(spec, config)
    layers, width, heads = (getattr(config, name, None) for name in ("n_layers", "d_model", "n_heads"))
    if seq_len and layers and width and heads:
        tokens = train.micro_batch_size * seq_len
        per_worker = (
            tokens * layers * (68 * width + 10 * heads * seq_len) + tokens * int(getattr(config, "vocab_size", 0)) * 12
        )
        activations = workers * per_worker
    return MemoryEstimate(parameters, weights + gradients + moments, activations, workers * WORKER_OVERHEAD_BYTES)


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    import psutil

    return int(psutil.virtual_memory().total)


def _gb(count: int) -> str:
    return f"{count / 2**30:,.1f} GiB"


def check_memory(spec: TrainSpec, config: Any, available: int | None = None) -> MemoryEstimate:
    """A CPU run's memory estimate fits in this machine's memory."""
    estimate = estimate_memory(spec, config)
    available = machine_memory() if available is None else available
    if spec.train.use_gpu or estimate.total <= available:
        return estimate
    if estimate.activations >= estimate.model_state:
        field_name, fix = (
            "train.micro_batch_size",
            "lower train.micro_batch_size (raise the accumulation), data.seq_len or train.workers",
        )
    else:
        field_name, fix = "model.name", "use a smaller model, a higher train.zero_stage or fewer train.workers"
    raise ConfigError(
        f"{field_name}: {spec.model.name} with {spec.train.workers} workers x micro_batch_size {spec.train.micro_batch_size} needs about "
        f"{_gb(estimate.total)} of memory (weights, gradients and optimizer {_gb(estimate.model_state)}, activations "
        f"{_gb(estimate.activations)}, processes {_gb(estimate.overhead)}; a rough estimate) and this machine has "
        f"{_gb(available)}; {fix}"
    )


def check_cpus(spec: TrainSpec, cores: int | None = None) -> None:
    """The embedded Ray can run ``workers x threads_per_worker`` threads (and a GPU per GPU worker)."""
    cores = cores or os.cpu_count() or 1
    train = spec.train
    threads, limit = train.workers * train.threads_per_worker, CPU_OVERSUBSCRIPTION * cores
    if threads > limit:
        raise ConfigError(
            f"train.workers: {train.workers} workers x {train.threads_per_worker} thread(s) asked, this machine has "
            f"{cores} CPU cores (at most {limit} worker threads: {CPU_OVERSUBSCRIPTION} per core); lower train.workers "
            "or train.threads_per_worker, or run on a cluster with --address"
        )
    if train.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if train.workers > gpus:
            raise ConfigError(
                f"train.workers: {train.workers} GPU workers asked (train.use_gpu: true), this machine has {gpus} GPU(s); "
                "lower train.workers, set train.use_gpu: false, or run on a cluster with --address"
            )


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """``host:port`` (or ``ray://host:port``) accepts a TCP connection within ``timeout_s`` (``auto`` is not probed)."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ValueError(f"Invalid address format: {address}")
    with socket.create_connection((host, port), timeout=timeout_s):
        pass


def check_cluster(spec: TrainSpec, address: str | None, wait_s: float = CLUSTER_WAIT_S) -> None:
    """Connect to the cluster and wait up to ``wait_s`` for the CPUs (and GPUs) the workers ask for."""
    import ray

    from .runner import init_ray

    target = address or os.environ.get("RAY_ADDRESS")
    try:
        if not ray.is_initialized():
            _reachable(str(target))
            init_ray(address, spec.train.workers)
    except (OSError, ValueError, RuntimeError) as error:
        from memel.redaction import redact

        message = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"--address: cannot connect to the Ray cluster at {shown(redact(str(target)))} ({message}); give a running cluster's address, e.g. ray://HEAD:10001 or auto on a node of it"
        ) from None
    wanted = {"CPU": spec.train.workers}  # one CPU per worker, as the runner's ScalingConfig asks
    if spec.train.use_gpu:
        wanted["GPU"] = spec.train.workers
    deadline = time.monotonic() + wait_s
    while True:
        offered = ray.cluster_resources()
        short = {name: count for name, count in wanted.items() if offered.get(name, 0) < count}
        if not short:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    asked = ", ".join(f"{count} {name}" for name, count in wanted.items())
    has = ", ".join(f"{offered.get(name, 0):g} {name}" for name in wanted)
    raise ConfigError(
        f"train.workers: {spec.train.workers} workers ask for {asked}, the cluster has {has} (waited {wait_s:g} s); "
        "lower train.workers or add nodes to the cluster"
    )


def check_state_files(folder: Path, names: tuple[str, ...] = (run_record.RUN_FILE, run_record.SUMMARY_FILE)) -> None:
    """The state files a resumed run reads in ``folder`` are readable (a ConfigError naming the file)."""
    from memel.atomic import read_state

    for name in names:
        if (folder / name).exists():
            read_state(folder / name)


def check_spec(spec: TrainSpec, address: str | None = None, connect: bool = True) -> None:
    """Every check a run of ``spec`` must pass before it starts (see the module docstring).

    ``connect=False`` skips the cluster checks (``memel validate`` starts nothing).
    """
    check_address_outputs(spec, address)
    check_state_files(spec.out)
    config = model_config(spec)
    check_sequence(spec, config)
    check_deepspeed(spec)
    if embedded(address):
        check_data_paths(spec)
        check_cpus(spec)
        check_memory(spec, config)
    elif connect:
        check_cluster(spec, address)


def preflight(
    job: TrainSpec, address: str | None = None, connect: bool = True, members: list[TrainSpec] | None = None
) -> None:
    """:func:`check_spec` on a job's base run, or on each of ``members`` (a sweep's member specs,
    which the caller expands: each rung differs)."""
    specs: list[TrainSpec] = members if members is not None else [job]
    check_state_files(job.out, (run_record.SWEEP_FILE, run_record.STUDY_FILE))
    for spec in specs:
        try:
            check_spec(spec, address, connect)
        except ConfigError as error:
            where = f"sweep member {spec.name.removeprefix(job.name + '-')}: " if spec is not job else ""
            raise ConfigError(f"{where}{error}") from None
