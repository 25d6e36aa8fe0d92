"""memel analyze's model-level computations against independent NumPy/autograd reproductions:
per-sample losses and feature groups of held-out data, the inhibition case study (Table 4) across seeds on a tiny model, and checkpoint loading."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import memel
import numpy as np
import pytest
import torch
from memel.analysis.case_study import case_study, ratios, summarize_case_study
from memel.analysis.heldout import grouped_batches, heldout_loader, sample_groups, sample_losses
from memel.data.documents import Document
from memel.training.objective import compute
from torch import nn


class Batch(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor


def tiny_mlp(seed: int = 0, hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(6, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, 3)))


# ------------------------------------------------------------------------------ held-out data
@pytest.mark.parametrize(("model_name", "data"), [
    ("byte-0.2m", {"kind": "text_lm", "corpus": "shakespeare", "seq_len": 32}),
    ("bert-byte-tiny", {"kind": "text_classification", "task": "prose_vs_code", "seq_len": 32}),
])  # fmt: skip
def test_sample_losses_add_up_to_the_objective(model_name: str, data: dict) -> None:
    from memel.models import build

    torch.manual_seed(0)
    model = build(model_name).eval()
    batch, _ = next(grouped_batches(data, 4, 1))
    with torch.no_grad():
        losses, items = sample_losses(model, batch, data["kind"])
        expected = compute(model, batch, data["kind"], torch.device("cpu"))
    assert float(losses.sum() / items.sum()) == pytest.approx(float(expected.loss), rel=1e-5)
    assert float(items.sum()) == expected.items


def test_groups_of_lm_windows_are_their_documents_corpora() -> None:
    data = {"kind": "text_lm", "corpus": "mixed", "seq_len": 64, "heldout_fraction": 0.2}
    loader = heldout_loader(data, 8)
    docs = [s for s in loader.stream.segments if isinstance(s, Document)]
    starts, position = [], 0
    for doc in docs:  # documents joined by the 2-byte separator "\n\n"
        starts.append(position)
        position += doc.size + 2
    assert len({d.label for d in docs}) >= 2
    indices = np.linspace(0, loader.num_examples() - 1, 200).astype(int)
    groups = sample_groups(loader, indices, None)
    for index, found in zip(indices, groups, strict=True):
        offset = int(index) * 64
        owner = max(i for i, s in enumerate(starts) if s <= offset)
        if offset >= starts[owner] + docs[owner].size:  # inside the separator: the next document
            owner += 1
        assert found == ["all", docs[owner].label]


def test_groups_of_classes_features_and_featureless_data() -> None:
    batch, groups = next(grouped_batches({"kind": "text_classification", "task": "prose_vs_code", "seq_len": 32}, 16, 1))
    assert [g[1] for g in groups] == [["prose", "code"][int(t)] for t in batch.targets]
    batch, groups = next(grouped_batches({"kind": "sparse_features", "num_features": 5, "active_prob": 0.5}, 8, 1))
    assert groups == [["all", *(f"feature {k}" for k in np.flatnonzero(row))] for row in batch.features.numpy()]
    _, groups = next(grouped_batches({"kind": "digits"}, 8, 1))
    assert groups == [["all"]] * 8
    assert len(list(grouped_batches({"kind": "digits"}, 8, 3))) == 3


# ------------------------------------------------------------------------------ case study
def test_ratios_match_numpy() -> None:
    rng = np.random.default_rng(2)
    z = {"a": rng.standard_normal((7, 5)), "b": rng.standard_normal((7, 3))}
    z_new = {k: v + 0.05 * rng.standard_normal(v.shape) for k, v in z.items()}
    stats = {k: (rng.standard_normal(v.shape[1]), rng.uniform(0.5, 2, v.shape[1])) for k, v in z.items()}
    got = ratios({k: torch.from_numpy(v) for k, v in z.items()}, {k: torch.from_numpy(v) for k, v in z_new.items()},
                 {k: (torch.from_numpy(m), torch.from_numpy(s)) for k, (m, s) in stats.items()}, eps=0.01, top_n=2)  # fmt: skip
    decrease, update, total = [], [], []
    for name, values in z.items():
        mean, var = stats[name]
        denominator = var + 0.01 * var.mean()
        before, after = (values - mean) ** 2 / denominator, (z_new[name] - mean) ** 2 / denominator
        for row in range(7):
            for neuron in np.argsort(-before[row])[:2]:
                decrease.append(1 - after[row, neuron] / before[row, neuron])
                update.append(abs(z_new[name][row, neuron] / values[row, neuron] - 1))
        total += list(np.abs(z_new[name] / values - 1).ravel())
    assert got.selected == 28 and got.values == 56
    assert (got.decrease_ratio, got.update_ratio, got.total_update_ratio) == (
        pytest.approx(100 * np.mean(decrease)),
        pytest.approx(100 * np.mean(update)),
        pytest.approx(100 * np.mean(total)),
    )


#: How each mode passes a selected value on: forward value mu, gradient times s (z' = s*z + (mu - s*z).detach()).
GRADIENT_SCALE = {"original": None, "naive_a": 0.0, "naive_b": 1.0, "rd": -1.0}


def _reproduce(model: nn.Sequential, state: dict, batch: Batch, mode: str, lr: float) -> tuple[float, float, float]:
    """The case study by hand: plain autograd, the mode as a hook, phi in NumPy float64."""
    model = copy.deepcopy(model)
    mean, var = state["mean"].double().numpy(), state["var"].double().numpy()
    denominator = var + 0.01 * var.mean()
    with torch.no_grad():
        z = model.act(model.fc1(batch.inputs)).double().numpy()
    phi = (z - mean) ** 2 / denominator
    selected = np.zeros_like(phi, dtype=bool)
    selected[np.arange(len(phi)), phi.argmax(1)] = True
    scale, handle = GRADIENT_SCALE[mode], None
    if scale is not None:
        mask, mu = torch.from_numpy(selected), state["mean"].float()

        def hook(_m, _a, out):
            return torch.where(mask, scale * out + (mu - scale * out).detach(), out)

        handle = model.act.register_forward_hook(hook)
    loss = nn.functional.cross_entropy(model(batch.inputs), batch.targets)
    loss.backward()
    if handle is not None:
        handle.remove()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
        z_new = model.act(model.fc1(batch.inputs)).double().numpy()
    phi_new = (z_new - mean) ** 2 / denominator
    decrease = 100 * np.mean(1 - phi_new[selected] / phi[selected])
    update = 100 * np.mean(np.abs(z_new[selected] / z[selected] - 1))
    return decrease, update, 100 * np.mean(np.abs(z_new / z - 1))


def test_case_study_on_a_tiny_model_across_seeds() -> None:
    model = tiny_mlp(3)
    config = {"mode": "original", "top_n": 1, "eps": 0.01, "forget_steps": 4, "kernel": "eager"}
    inserted = memel.inhibit(model, ["act"], memel.InhibitionConfig(**config))
    model.train()
    torch.manual_seed(0)
    for _ in range(6):  # trained statistics
        model(torch.randn(32, 6))
    memel.sync(model)
    states = {name: copy.deepcopy(m.state_dict()) for name, m in inserted.items()}
    memel.remove(model)
    batches = {seed: Batch(torch.randn(24, 6, generator=torch.Generator().manual_seed(seed)),
                           torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(seed + 100))) for seed in range(3)}  # fmt: skip
    reference = copy.deepcopy(model.state_dict())
    per_seed = case_study(model, ["act"], states, config, batches, "digits", lr=0.5)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())  # the model itself is untouched
    assert sorted(zip(per_seed["mode"], per_seed["seed"])) == sorted((m, s) for m in GRADIENT_SCALE for s in range(3))
    for row in per_seed.itertuples():
        decrease, update, total = _reproduce(model, states["act"], batches[row.seed], row.mode, 0.5)
        assert row.decrease_ratio == pytest.approx(decrease, rel=1e-4, abs=1e-6), row
        assert row.update_ratio == pytest.approx(update, rel=1e-4)
        assert row.total_update_ratio == pytest.approx(total, rel=1e-4)
        assert row.selected == 24 and row.values == 24 * 16
    modes = per_seed.set_index(["mode", "seed"])["decrease_ratio"]
    assert len({round(modes[(m, 0)], 9) for m in GRADIENT_SCALE}) == 4  # every mode moves the selected values differently

    from scipy import stats as st

    summary = summarize_case_study(per_seed).set_index("mode")
    assert list(summary.index) == ["original", "naive_a", "naive_b", "rd"]
    for mode in GRADIENT_SCALE:
        values = per_seed[per_seed["mode"] == mode].sort_values("seed")["decrease_ratio"].to_numpy()
        low, high = st.t.interval(0.95, 2, loc=values.mean(), scale=st.sem(values))
        assert summary.loc[mode, "decrease_ratio"] == pytest.approx(values.mean())
        assert (summary.loc[mode, "decrease_ratio_ci_low"], summary.loc[mode, "decrease_ratio_ci_high"]) == (
            pytest.approx(low),
            pytest.approx(high),
        )
        base = per_seed[per_seed["mode"] == "original"].sort_values("seed")["decrease_ratio"].to_numpy()
        assert summary.loc[mode, "vs_original"] == pytest.approx((values - base).mean(), abs=1e-12)
        expected = "+" if values.mean() > 0 else "-"
        assert summary.loc[mode, "sign"] in (expected, f"({expected})")
    assert summary.loc["rd", "paper_sign"] == "+" and summary.loc["naive_b", "paper_sign"] == "-"


# ------------------------------------------------------------------------------ checkpoints
def test_load_member_from_a_zero0_checkpoint(tmp_path: Path) -> None:
    from memel.analysis.checkpoint import load_member
    from memel.analysis.source import member_from_spec
    from memel.models import build, preset_targets
    from memel.training import TrainSpec

    spec = TrainSpec(name="ckpt", model={"name": "byte-0.2m"}, inhibition={"mode": "rd", "kernel": "eager"})
    torch.manual_seed(4)
    model = build("byte-0.2m")
    inserted = memel.inhibit(model, preset_targets("byte-0.2m", "mlp"), spec.inhibition)
    model.train()
    model(torch.randint(0, 256, (2, 16)))
    memel.sync(model)
    tag = tmp_path / "step-000000007"
    tag.mkdir()
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "memel").mkdir()
    torch.save({n: m.state_dict() for n, m in inserted.items()}, tmp_path / "memel" / "inhibition.pt")
    (tmp_path / "memel" / "progress.json").write_text(json.dumps({"step": 7, "tag": "step-000000007"}))
    member = member_from_spec("run-c", spec.model_dump(mode="json"), "m", {"checkpoint": str(tmp_path)})
    trained = load_member(member)
    memel.remove(model)
    assert trained.step == 7 and trained.kind == "text_lm" and not trained.model.training
    assert trained.model.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(trained.model.state_dict()[k], v) for k, v in model.state_dict().items())
    again = trained.insert(mode="original")
    for name, module in again.items():
        assert module.config.mode == "original" and torch.equal(module.mean, inserted[name].mean)
