"""Data-parallel statistics: 2 gloo ranks on halves of each batch equal 1 process on the whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed import counting_all_reduce, run_distributed
from torch import nn

import memel

STEPS = 7
CONFIG = dict(mode="rd", top_n=2, forget_steps=3, late_start=2, stats_update="step")


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(12, 12), nn.Tanh()) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(8, 5, 12, generator=generator) * 2 + 3 for _ in range(STEPS)]


def _model() -> Host:
    torch.manual_seed(0)
    model = Host()
    memel.inhibit(model, "blocks.*.1", memel.InhibitionConfig(**CONFIG))
    return model


def _train(model: Host, batches: list[torch.Tensor], micro: int, async_op: bool) -> dict:
    record: dict = {"outputs": [], "stats": [], "grads": []}
    for batch in batches:
        outputs = []
        for chunk in batch.chunk(micro):
            x = chunk.clone().requires_grad_(True)
            out = model(x)
            (out * 1.5).sum().backward()
            outputs.append(out.detach())
            record["grads"].append(x.grad)
        memel.sync(model, async_op=async_op)
        record["outputs"].append(torch.cat(outputs))
        record["stats"].append({name: m.statistics() for name, m in memel.inhibitors(model).items()})
    return record


def _worker(rank: int, world_size: int, out_dir: str, micro: int, async_op: bool) -> None:
    torch.set_num_threads(1)
    with counting_all_reduce() as calls:
        model = _model()
        half = [batch.chunk(world_size)[rank] for batch in _data()]
        record = _train(model, half, micro, async_op)
    record["all_reduce_calls"] = calls["all_reduce"]
    record["snapshot"] = {k: v.as_numpy() for k, v in memel.snapshot(model).items()}
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.parametrize(("micro", "async_op"), [(1, False), (2, False), (1, True)])
def test_two_ranks_hold_the_global_statistics(tmp_path: Path, micro: int, async_op: bool) -> None:
    run_distributed(_worker, 2, str(tmp_path), micro, async_op)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single_model = _model()
    single = _train(single_model, _data(), micro=1, async_op=False)

    # micro-batches of one optimizer step count as ONE batch; all modules share ONE collective
    for record in ranks:
        assert record["all_reduce_calls"] == STEPS
    for step in range(STEPS):
        for name, expected in single["stats"][step].items():
            scale = expected["var"].sqrt().clamp_min(1e-6)
            for record in ranks:
                got = record["stats"][step][name]
                assert got["batches"] == expected["batches"] == step + 1
                assert torch.equal(got["count"], expected["count"])
                assert ((got["mean"] - expected["mean"]).abs() <= 1e-5 * scale).all(), (step, name)
                assert ((got["var"] - expected["var"]).abs() <= 1e-5 * scale**2).all(), (step, name)
            # every rank holds identical statistics
            a, b = (r["stats"][step][name] for r in ranks)
            assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["var"], b["var"])
        # same selections (and so the same outputs) as one process on the whole batch
        both = torch.cat([ranks[0]["outputs"][step], ranks[1]["outputs"][step]])
        torch.testing.assert_close(both, single["outputs"][step], rtol=1e-5, atol=1e-5)
    # inhibition really happened after late start, and gradients were reversed somewhere
    assert ranks[0]["snapshot"]["blocks.1.1"]["inhibited_count"].sum() > 0
    for key in ("selected_count", "inhibited_count", "frac_above"):
        for name in ranks[0]["snapshot"]:
            assert (ranks[0]["snapshot"][name][key] == ranks[1]["snapshot"][name][key]).all()
    for name, snap in memel.snapshot(single_model).items():
        assert (snap.selected_count.numpy() == ranks[0]["snapshot"][name]["selected_count"]).all()
        torch.testing.assert_close(
            torch.as_tensor(ranks[0]["snapshot"][name]["max_ms"]), snap.max_ms, rtol=1e-4, atol=1e-4
        )


#: Inhibition settings whose input gradients 2 ranks must share with 1 process on the whole batch.
GRADIENT_CASES = {
    f"{mode}-{select}-{update}": dict(
        mode=mode,
        select=select,
        stats_update=update,
        forget_steps=3,
        late_start=2,
        **({"top_n": 2} if select == "top_n" else {"fraction": 0.05}),
        **({"strength": 2.0} if mode == "rd" else {}),
    )
    for mode in ("rd", "naive_a", "naive_b", "l2e")
    for select in ("top_n", "threshold")
    for update in ("call", "step")
    if not (mode == "l2e" and select == "threshold")  # a per-rank mean over rank-dependent counts
}


def _input_gradients(config: dict, batches: list[torch.Tensor], loss_share: float) -> dict:
    """Per step: the gradient of the input and the outputs, for one model under ``config``."""
    torch.manual_seed(0)
    model = Host()
    memel.inhibit(model, "blocks.*.1", memel.InhibitionConfig(**config))
    grads, modified = [], 0
    for batch in batches:
        x = batch.clone().requires_grad_(True)
        out = model(x)
        loss = (out * 1.5).sum() + memel.auxiliary_loss(model) * loss_share
        loss.backward()
        if config["stats_update"] == "step":
            memel.sync(model)
        grads.append(x.grad)
    for snap in memel.snapshot(model).values():
        modified += int(snap.inhibited_count.sum()) + int(snap.selected_count.sum())
    return {"grads": grads, "modified": modified}


def _gradient_worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    half = [batch.chunk(world_size)[rank] for batch in _data()]
    # l2e's loss is a mean over the rank's selected values: top-n selects the same number per
    # sample, so 1/world_size of a rank's term is the global mean's share of its values
    records = {name: _input_gradients(config, half, 1.0 / world_size) for name, config in GRADIENT_CASES.items()}
    torch.save(records, Path(out_dir) / f"grads{rank}.pt")


def test_two_ranks_give_each_input_the_single_process_gradient(tmp_path: Path) -> None:
    """rd, naive_a, naive_b and l2e; top-n and threshold; call and step updates: the input
    gradients of 2 ranks on halves of each batch, put together, equal one process's on the
    whole batch. Fails if any mode's backward differs under torch.distributed."""
    run_distributed(_gradient_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"grads{r}.pt", weights_only=False) for r in range(2)]
    for name, config in GRADIENT_CASES.items():
        single = _input_gradients(config, _data(), 1.0)
        assert single["modified"] > 0, name  # something was selected, so the gradients are tested
        plain = _input_gradients({**config, "mode": "original"}, _data(), 1.0)["grads"]
        changed = False
        for step, expected in enumerate(single["grads"]):
            got = torch.cat([ranks[0][name]["grads"][step], ranks[1][name]["grads"][step]])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} step {step}: {m}")
            changed |= not torch.allclose(expected, plain[step])
        if config["mode"] != "naive_b":  # naive (b) keeps the gradient unchanged by definition
            assert changed, f"{name}: inhibition never changed an input gradient"


def _subgroup_worker(rank: int, world_size: int, out_dir: str) -> None:
    """Ranks 0 and 1 inhibit with the process group {0, 1}; rank 2 with {2} (its own)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    pair, alone = dist.new_group([0, 1]), dist.new_group([2])  # every rank creates every group
    torch.manual_seed(0)
    model = Host()
    memel.inhibit(model, "blocks.*.1", memel.InhibitionConfig(**CONFIG), process_group=pair if rank < 2 else alone)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(4):
        model(torch.randn(6, 12, generator=generator) * (1 + rank))
        memel.sync(model)  # no group given: each module's own
    found = memel.inhibitors(model)
    record = {
        "local": {n: m.snapshot(reset=False, reduce=False).as_numpy() for n, m in found.items()},
        "module": {n: m.snapshot(reset=False).as_numpy() for n, m in found.items()},
        "model": {n: s.as_numpy() for n, s in memel.snapshot(model, reset=False).items()},
        # an explicit group overrides the modules' own
        "world": {
            n: s.as_numpy() for n, s in memel.snapshot(model, reset=False, process_group=dist.group.WORLD).items()
        },
        "mean": {n: m.statistics()["mean"] for n, m in found.items()},
    }
    torch.save(record, Path(out_dir) / f"subgroup{rank}.pt")


def test_statistics_and_snapshots_reduce_over_the_modules_own_process_group(tmp_path: Path) -> None:
    """3 gloo ranks; the modules of ranks 0 and 1 are inserted with the group {0, 1}, rank 2's
    with {2}: sync, ``Inhibitor.snapshot()`` and ``memel.snapshot(model)`` reduce over that
    group, not the default world (which would add rank 2's counts, or hang); an explicit
    ``process_group`` overrides it."""
    run_distributed(_subgroup_worker, 3, str(tmp_path))
    ranks = [torch.load(tmp_path / f"subgroup{r}.pt", weights_only=False) for r in range(3)]
    names = list(ranks[0]["local"])
    assert len(names) == 3
    for name in names:
        local = [r["local"][name] for r in ranks]
        pair_selected = local[0]["selected_count"] + local[1]["selected_count"]
        all_selected = pair_selected + local[2]["selected_count"]
        assert (local[0]["selected_count"] != local[1]["selected_count"]).any()  # the ranks really differ
        assert (local[2]["selected_count"] > 0).any()  # rank 2's counts would show in a world reduction
        for rank in (0, 1):
            for kind in ("module", "model"):
                got = ranks[rank][kind][name]
                assert (got["selected_count"] == pair_selected).all(), (rank, kind, name)
                assert (got["max_ms"] == local[0]["max_ms"].clip(min=local[1]["max_ms"])).all()
        for kind in ("module", "model"):
            assert (ranks[2][kind][name]["selected_count"] == local[2]["selected_count"]).all(), (kind, name)
        for record in ranks:
            assert (record["world"][name]["selected_count"] == all_selected).all(), name
        # sync merged the pair's statistics (identical on ranks 0 and 1), and rank 2's alone
        assert torch.equal(ranks[0]["mean"][name], ranks[1]["mean"][name])
        assert not torch.equal(ranks[0]["mean"][name], ranks[2]["mean"][name])


def _call_update_worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Host()
    memel.inhibit(model, "blocks.*.1", memel.InhibitionConfig(**{**CONFIG, "stats_update": "call"}))
    with counting_all_reduce() as calls:
        for batch in _data():
            model(batch.chunk(world_size)[rank])
    torch.save({"all_reduce_calls": calls["all_reduce"]}, Path(out_dir) / f"call{rank}.pt")


def test_call_updates_reduce_all_modules_of_one_inhibit_in_one_collective(tmp_path: Path) -> None:
    """With stats_update="call", the 3 modules of one memel.inhibit call merge the previous
    call's statistics with ONE all-reduce per training call (not one per module)."""
    run_distributed(_call_update_worker, 2, str(tmp_path))
    for rank in range(2):
        record = torch.load(tmp_path / f"call{rank}.pt", weights_only=False)
        assert record["all_reduce_calls"] == STEPS - 1  # the first call has nothing to merge yet
