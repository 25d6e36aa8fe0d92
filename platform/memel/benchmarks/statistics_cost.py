"""What the inhibitors' statistics cost at scale: memory per rank and bytes all-reduced per step.

A cost model, not a measurement: the neurons of every inserted module come from one forward
on the meta device (nothing is allocated), and each neuron costs the bytes listed in
``STATE_BYTES`` (every rank holds them all: the statistics are replicated), ``PAYLOAD_BYTES``
per optimizer step (the pending moments that ``memel.sync`` all-reduces) and ``WINDOW_BYTES``
per snapshot. ``measured_state_bytes`` counts the tensors a real Inhibitor holds after a real
forward, so the tests can hold the model to the implementation.

With ``shard_ranks`` = W > 1 (``execution.shard_statistics``) each rank holds ceil(N / W)
neurons of each module at ``SHARDED_STATE_BYTES`` each, and every training call (micro-batch)
moves ``SHARDED_CALL_BYTES`` per neuron: a reduce-scatter of its contributions and an
all-gather of the module's mean and variance.

The modelled step of ``step_seconds`` is compute-bound: 6 x parameters x tokens per step
FLOPs over ``gpus`` x ``peak_flops`` x ``mfu``; a ring all-reduce of P bytes over G GPUs moves
2 (G-1)/G x P bytes per GPU at ``bus_bandwidth``, a ring reduce-scatter or all-gather of P
bytes (the whole tensor) (G-1)/G x P (``docs/scaling.md`` states the defaults).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from memel.models import build, get_config, preset_targets

#: Bytes per neuron that every rank holds: (what, bytes).
STATE_BYTES: tuple[tuple[str, int], ...] = (
    ("mean (float32)", 4),
    ("var (float32)", 4),
    ("count (int64)", 8),
    ("pending moments: count, sum d, sum d^2 (3 x float64)", 24),
    ("snapshot window: selected, inhibited, MS sum, MS n, above, tracked, MS max (7 x float64)", 56),
    ("MS scale of the current history (float32)", 4),
    ("history mean of the last fused call (float32)", 4),
)
#: Bytes per neuron all-reduced once per optimizer step (the pending moments).
PAYLOAD_BYTES = 24
#: Bytes per neuron reduced at each snapshot (the window rows).
WINDOW_BYTES = 56
#: Bytes per neuron of its shard that a rank holds with sharded statistics: (what, bytes).
SHARDED_STATE_BYTES: tuple[tuple[str, int], ...] = (
    ("mean (float32)", 4),
    ("var (float32)", 4),
    ("count (int64)", 8),
    ("pending moments: count, sum d, sum d^2 (3 x float64)", 24),
    ("snapshot window counters: selected, inhibited, MS n, above (4 x int32)", 16),
    ("snapshot window MS sum (float64)", 8),
    ("snapshot window max MS (float32)", 4),
)
#: Bytes per neuron (of the whole module) one training call moves with sharded statistics.
SHARDED_CALL_BYTES: tuple[tuple[str, int], ...] = (
    ("moments, reduce-scattered (3 x float64)", 24),
    ("window counters: MS sum, MS n, above, selected, reduce-scattered (4 x float32)", 16),
    ("max MS, reduce-scattered (float32; tracked calls)", 4),
    ("mean and var, all-gathered (2 x float32)", 8),
)

#: Defaults of the modelled node: 8 GPUs of H100/H200 class on NVLink.
GPUS = 8
PEAK_FLOPS = 989e12  # dense bf16 per GPU
MFU = 0.4
BUS_BANDWIDTH = 450e9  # bytes/s per GPU that NCCL's ring reaches on NVLink (bus bandwidth)
TOKENS_PER_STEP = 1024 * 2048  # Pythia's global batch: 1,024 sequences of 2,048 tokens
MICRO_BATCH = 8  # sequences per GPU in one training call (micro-batch)


def sharded_neurons(neurons: int, shard_ranks: int) -> int:
    """Neurons of a module of ``neurons`` that each of ``shard_ranks`` ranks holds: ceil(N / W)."""
    return -(-neurons // shard_ranks)


@dataclass(frozen=True)
class StatisticsCost:
    """The modelled statistics cost of one model, layout, preset and sequence length.

    ``module_neurons``: ``channel`` counts the last dimension of a module's output, ``element``
    every value of one sample (position x channel), as the Inhibitor's layouts do;
    ``positions``: positions per sample (tokens, or patches + CLS); ``shard_ranks``: the ranks
    the statistics are sharded over (1: replicated)."""

    model: str
    layout: str
    preset: str
    positions: int
    parameters: int
    module_neurons: dict[str, int]
    shard_ranks: int = 1

    @property
    def sharded(self) -> bool:
        return self.shard_ranks > 1

    @property
    def neurons(self) -> int:
        return sum(self.module_neurons.values())

    @property
    def held_neurons(self) -> int:
        """Neurons whose state one rank holds: all, or ceil(N / W) of each module."""
        if not self.sharded:
            return self.neurons
        return sum(sharded_neurons(n, self.shard_ranks) for n in self.module_neurons.values())

    @property
    def state_bytes(self) -> int:
        """Statistics memory per rank (replicated: all neurons; sharded: its shards)."""
        per_neuron = SHARDED_STATE_BYTES if self.sharded else STATE_BYTES
        return self.held_neurons * sum(size for _, size in per_neuron)

    @property
    def payload_bytes(self) -> int:
        """Replicated: bytes all-reduced per optimizer step; sharded: bytes reduce-scattered and
        all-gathered per training call (the whole tensors)."""
        if self.sharded:
            return self.neurons * sum(size for _, size in SHARDED_CALL_BYTES)
        return self.neurons * PAYLOAD_BYTES

    @property
    def window_bytes(self) -> int:
        """Bytes reduced per snapshot."""
        return self.neurons * WINDOW_BYTES

    @property
    def param_bytes_bf16(self) -> int:
        return 2 * self.parameters

    @property
    def state_fraction(self) -> float:
        """Statistics memory per rank over the model's bf16 parameter memory."""
        return self.state_bytes / self.param_bytes_bf16

    def reduce_seconds(self, gpus: int = GPUS, bus_bandwidth: float = BUS_BANDWIDTH) -> float:
        """Time of the ring all-reduce of the payload (replicated, once per optimizer step), or of
        its reduce-scatter and all-gather (sharded, once per training call)."""
        passes = 1 if self.sharded else 2
        return passes * (gpus - 1) / gpus * self.payload_bytes / bus_bandwidth

    def calls_per_step(self, gpus: int = GPUS, tokens: int = TOKENS_PER_STEP, micro_batch: int = MICRO_BATCH) -> int:
        """Training calls (micro-batches of ``micro_batch`` sequences per GPU) in a step of ``tokens``."""
        return max(1, -(-tokens // (gpus * micro_batch * max(self.positions, 1))))

    def step_seconds(
        self, gpus: int = GPUS, peak_flops: float = PEAK_FLOPS, mfu: float = MFU, tokens: int = TOKENS_PER_STEP
    ) -> float:
        """Modelled time of one optimizer step (compute-bound)."""
        return 6 * self.parameters * tokens / (gpus * peak_flops * mfu)

    def reduce_fraction(self, gpus: int = GPUS, tokens: int = TOKENS_PER_STEP, micro_batch: int = MICRO_BATCH) -> float:
        """The statistics' communication in one step over the modelled step time (sharded:
        once per training call of ``micro_batch`` sequences per GPU)."""
        calls = self.calls_per_step(gpus, tokens, micro_batch) if self.sharded else 1
        return calls * self.reduce_seconds(gpus) / self.step_seconds(gpus, tokens=tokens)


def _example_input(model: str, seq_len: int) -> torch.Tensor:
    config = get_config(model)
    if hasattr(config, "vocab_size"):
        return torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    if hasattr(config, "image_size"):
        size, channels = config.image_size, config.in_channels
        return torch.zeros(1, channels, size, size, device="meta")
    raise ValueError(f"model: the statistics cost model covers token and image models, not {model!r}")


def module_shapes(model: str, preset: str, seq_len: int) -> dict[str, tuple[int, ...]]:
    """Output shape of every module ``preset`` inserts at, for one sample of ``seq_len`` tokens
    (image models: one image of the configured size), from a forward on the meta device."""
    network = build(model, device="meta")
    patterns = preset_targets(model, preset)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
        shapes.setdefault(name, tuple((output[0] if isinstance(output, tuple) else output).shape))

    for name, module in network.named_modules():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
    with torch.no_grad():
        network(_example_input(model, seq_len))
    return shapes


def statistics_cost(
    model: str, layout: str = "element", preset: str = "paper", seq_len: int = 2048, shard_ranks: int = 1
) -> StatisticsCost:
    """The modelled statistics cost of ``model`` with ``preset`` in ``layout`` at ``seq_len``
    tokens (at most the model's context length: ``positions`` of the result says which),
    replicated (``shard_ranks`` 1) or sharded over ``shard_ranks`` ranks."""
    if shard_ranks < 1:
        raise ValueError(f"shard_ranks: {shard_ranks} ranks; allowed: 1 (replicated) or more")
    config = get_config(model)
    seq_len = min(seq_len, getattr(config, "context_length", getattr(config, "max_positions", seq_len)))
    shapes = module_shapes(model, preset, seq_len)
    positions = max((int(torch.Size(shape[1:-1]).numel()) for shape in shapes.values()), default=0)
    neurons = {
        name: shape[-1] if layout == "channel" else int(torch.Size(shape[1:]).numel()) for name, shape in shapes.items()
    }
    parameters = sum(p.numel() for p in build(model, device="meta").parameters())
    return StatisticsCost(model, layout, preset, positions, parameters, neurons, shard_ranks)


def measured_state_bytes(inhibitor: torch.nn.Module) -> int:
    """Bytes of the per-neuron tensors a real Inhibitor holds (its buffers and cached tensors
    whose size scales with the neurons it holds: all, or its shard)."""
    neurons = int(getattr(inhibitor, "held_neurons", getattr(inhibitor, "neurons", 0)))
    seen: dict[int, int] = {}
    tensors = list(inhibitor.buffers()) + [v for v in vars(inhibitor).values() if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        if neurons and tensor.numel() % neurons == 0 and tensor.numel() >= neurons:
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())
