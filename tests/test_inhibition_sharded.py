"""Sharded statistics (``execution.shard_statistics``): 2 gloo ranks, each holding half of every
module's statistics, equal 1 process holding all of them (statistics, selections, outputs,
gradients, snapshots), and hold what the cost model says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import run_distributed
from torch import nn

import memel
from memel.benchmarks.statistics_cost import SHARDED_STATE_BYTES, measured_state_bytes, sharded_neurons
from memel.errors import ConfigError

STEPS = 6
SNAPSHOT_AFTER = 3  # a snapshot (with reset) after this step, another at the end
WIDTH, POSITIONS = 13, 5  # 65 neurons per module in the element layout: odd, not divisible by 2
CASES = {
    "rd-top_n-step": dict(mode="rd", top_n=2, stats_update="step", strength=2.0),
    "rd-threshold-call": dict(mode="rd", select="threshold", fraction=0.05, stats_update="call"),
    "l2e-top_n-call": dict(mode="l2e", top_n=2, stats_update="call"),
    "naive_a-top_n-step": dict(mode="naive_a", top_n=1, stats_update="step"),
}
COMMON = dict(layout="element", forget_steps=2, late_start=2, shard_statistics=True)


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(8, POSITIONS, WIDTH, generator=generator) * 2 + 1 for _ in range(STEPS)]


def _train(config: dict, batches: list[torch.Tensor], micro: int, loss_share: float) -> dict:
    """Per step: outputs, input gradients, statistics; snapshots after ``SNAPSHOT_AFTER`` and at the end."""
    torch.manual_seed(0)
    model = Host()
    memel.inhibit(model, "blocks.*.1", memel.InhibitionConfig(**COMMON, **config))
    record: dict = {"outputs": [], "grads": [], "stats": [], "snapshots": []}
    for step, batch in enumerate(batches):
        outputs, grads = [], []
        for chunk in batch.chunk(micro):
            x = chunk.clone().requires_grad_(True)
            out = model(x)
            ((out * 1.5).sum() + memel.auxiliary_loss(model) * loss_share).backward()
            outputs.append(out.detach())
            grads.append(x.grad)
        memel.sync(model)
        record["outputs"].append(torch.cat(outputs))
        record["grads"].append(torch.cat(grads))
        record["stats"].append({name: m.statistics() for name, m in memel.inhibitors(model).items()})
        if step + 1 in (SNAPSHOT_AFTER, STEPS):
            record["snapshots"].append({name: s.as_numpy() for name, s in memel.snapshot(model).items()})
    found = memel.inhibitors(model)
    record["sharded"] = [m.sharded for m in found.values()]
    record["held"] = {name: measured_state_bytes(m) for name, m in found.items()}
    record["neurons"] = {name: m.neurons for name, m in found.items()}
    record["threshold"] = {name: m.threshold() for name, m in found.items()}
    return record


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    half = [batch.chunk(world_size)[rank] for batch in _data()]
    records = {}
    for name, config in CASES.items():
        micro = 2 if config["stats_update"] == "step" else 1
        # l2e's loss is a mean over the rank's selected values: top-n selects the same number per
        # sample, so 1/world_size of a rank's term is the global mean's share of its values
        records[name] = _train(config, half, micro, 1.0 / world_size)
    torch.save(records, Path(out_dir) / f"rank{rank}.pt")


def _close(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> bool:
    return bool(((got - expected).abs() <= 1e-5 * scale).all())


def test_two_sharded_ranks_equal_one_process(tmp_path: Path) -> None:
    """rd (top-n, threshold), l2e and naive_a; call and step updates with micro-batches; a forget
    step (forget_steps=2) and two snapshots: 2 ranks holding half of every module's
    statistics (65 neurons: shards of 33 and 32) equal 1 process holding all of them."""
    run_distributed(_worker, 2, str(tmp_path))
    _compare([torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)])


def _compare(ranks: list[dict]) -> None:
    for case, config in CASES.items():
        single = _train(config, _data(), 1, 1.0)
        assert single["sharded"] == [False, False]  # one process: shard_statistics changes nothing
        got = [record[case] for record in ranks]
        assert got[0]["sharded"] == got[1]["sharded"] == [True, True], case
        for step in range(STEPS):
            for name, expected in single["stats"][step].items():
                scale = expected["var"].sqrt().clamp_min(1e-6)
                for record in got:
                    stats = record["stats"][step][name]
                    assert stats["batches"] == expected["batches"] == step + 1
                    assert torch.equal(stats["count"], expected["count"])
                    assert _close(stats["mean"], expected["mean"], scale), (case, step, name)
                    assert _close(stats["var"], expected["var"], scale**2), (case, step, name)
            outputs = torch.cat([got[0]["outputs"][step], got[1]["outputs"][step]])
            torch.testing.assert_close(outputs, single["outputs"][step], rtol=1e-5, atol=1e-5)
            grads = torch.cat([got[0]["grads"][step], got[1]["grads"][step]])
            torch.testing.assert_close(grads, single["grads"][step], rtol=1e-5, atol=1e-6, msg=case)
        for index, snapshots in enumerate(single["snapshots"]):
            for name, expected in snapshots.items():
                for record in got:
                    snap = record["snapshots"][index][name]
                    for key in ("count", "selected_count", "inhibited_count", "batches", "neuron_shape"):
                        assert np.array_equal(snap[key], expected[key]), (case, index, name, key)
                    for key in ("max_ms", "mean_ms", "frac_above", "mean", "var"):
                        torch.testing.assert_close(
                            torch.as_tensor(snap[key]), torch.as_tensor(expected[key]), rtol=1e-5, atol=1e-6
                        )
        selected = sum(int(s["selected_count"].sum()) for snaps in single["snapshots"] for s in snaps.values())
        inhibited = sum(int(s["inhibited_count"].sum()) for snaps in single["snapshots"] for s in snaps.values())
        assert selected > 0 and inhibited > 0, case  # selections and inhibition were really compared
        assert got[0]["threshold"] == pytest.approx(single["threshold"], rel=1e-12)
        # each rank holds the cost model's sharded state: ceil(65 / 2) neurons of each module
        per_neuron = sum(size for _, size in SHARDED_STATE_BYTES)
        for rank, record in enumerate(got):
            for name, neurons in record["neurons"].items():
                assert neurons == POSITIONS * WIDTH
                assert record["held"][name] == sharded_neurons(neurons, 2) * per_neuron, (case, rank, name)


def _refused_state_dict(rank: int, world_size: int, out_dir: str) -> None:
    model = Host()
    memel.inhibit(model, "blocks.*.1", memel.InhibitionConfig(**COMMON))
    model(torch.randn(4, POSITIONS, WIDTH))
    state = model.state_dict()
    fresh = Host()
    memel.inhibit(fresh, "blocks.*.1", memel.InhibitionConfig(**COMMON))
    try:
        fresh.load_state_dict(state)
    except RuntimeError as error:
        (Path(out_dir) / f"refused{rank}.txt").write_text(str(error))


def test_sharded_statistics_refuse_to_load_from_a_state_dict(tmp_path: Path) -> None:
    """A rank's state_dict holds its shard only: loading it is refused, with the key named."""
    run_distributed(_refused_state_dict, 2, str(tmp_path))
    for rank in range(2):
        assert "execution.shard_statistics" in (tmp_path / f"refused{rank}.txt").read_text()


def test_the_key_defaults_off_and_is_written_only_when_on() -> None:
    assert memel.InhibitionConfig().shard_statistics is False
    assert "shard_statistics" not in memel.InhibitionConfig().model_dump()
    on = memel.InhibitionConfig(shard_statistics=True)
    assert on.model_dump()["shard_statistics"] is True
    assert memel.InhibitionConfig(execution={"shard_statistics": True}) == on
    with pytest.raises(ConfigError, match="shard_statistics"):
        memel.InhibitionConfig(shard_statistics="sometimes")
