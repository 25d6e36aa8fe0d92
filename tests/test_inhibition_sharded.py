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


def _model(config: dict) -> Host:
    torch.manual_seed(0)
    model = Host()
    memel.inhibit(model, "blocks.*.1", memel.InhibitionConfig(**COMMON, **config))
    return model


def _steps(model: Host, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        (model(batch) * 1.5).sum()
        memel.sync(model)


def _resume(rank: int, world_size: int, out_dir: str) -> None:
    """Train 3 steps, save each rank's state_dict, train 3 more; a fresh model that loads the
    rank's own state_dict and trains the same 3 steps must end in the same state."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(out_dir)
    half = [batch.chunk(world_size)[rank] for batch in _data()]
    config = CASES["rd-top_n-step"]
    model = _model(config)
    _steps(model, half[:3])
    torch.save(model.state_dict(), out / f"state{rank}.pt")
    dist.barrier()
    _steps(model, half[3:])
    resumed = _model(config)
    resumed.load_state_dict(torch.load(out / "state0.pt"))  # as DeepSpeed restores rank 0's module state
    refused = ""
    if rank == 1:  # (rank 0 holds its own shard: a forward there would wait for rank 1's collectives)
        try:
            resumed(half[3])
        except RuntimeError as error:
            refused = str(error)
    resumed.load_state_dict(torch.load(out / f"state{rank}.pt"))
    _steps(resumed, half[3:])
    record = {
        "refused": refused,
        "stats": [{n: m.statistics() for n, m in memel.inhibitors(x).items()} for x in (model, resumed)],
        "snapshots": [{n: s.as_numpy() for n, s in memel.snapshot(x).items()} for x in (model, resumed)],
    }
    torch.save(record, out / f"resume{rank}.pt")


def test_each_rank_resumes_from_its_own_shard(tmp_path: Path) -> None:
    """A rank's state_dict holds its shard: loaded back on the same 2 ranks, training goes on
    exactly as without the interruption; another rank's shard loads (as DeepSpeed restores
    rank 0's module state everywhere) but refuses to train; 1 process refuses a shard."""
    run_distributed(_resume, 2, str(tmp_path))
    for rank in range(2):
        record = torch.load(tmp_path / f"resume{rank}.pt", weights_only=False)
        assert ("another rank's shard" in record["refused"]) == (rank == 1), record["refused"]
        uninterrupted, resumed = record["stats"]
        for name, expected in uninterrupted.items():
            for key in ("mean", "var", "count"):
                assert torch.equal(resumed[name][key], expected[key]), (rank, name, key)
            assert resumed[name]["batches"] == expected["batches"] == STEPS
        for name, expected in record["snapshots"][0].items():
            for key, value in expected.items():
                assert np.array_equal(record["snapshots"][1][name][key], value), (rank, name, key)
    alone = _model(CASES["rd-top_n-step"])  # no process group here: not sharded
    with pytest.raises(RuntimeError, match="sharded over 2 ranks"):
        alone.load_state_dict(torch.load(tmp_path / "state0.pt"))


def test_the_key_defaults_off_and_is_written_only_when_on() -> None:
    assert memel.InhibitionConfig().shard_statistics is False
    assert "shard_statistics" not in memel.InhibitionConfig().model_dump()
    on = memel.InhibitionConfig(shard_statistics=True)
    assert on.model_dump()["shard_statistics"] is True
    assert memel.InhibitionConfig(execution={"shard_statistics": True}) == on
    with pytest.raises(ConfigError, match="shard_statistics"):
        memel.InhibitionConfig(shard_statistics="sometimes")
