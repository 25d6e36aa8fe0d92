"""The Table 4 case study on constructed data with known answers: the modification agrees with the
Inhibitor, Lemma 3.3's alignment diagnostic is 1 and 0 where it must be, the Decrease and Total
Update Ratios match closed forms and an independent NumPy reproduction, the random control picks
the same count, and on pure noise the paired intervals cover 0 at their nominal rate."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import memel
from memel.analysis.case_study import (
    MODES,
    Modifier,
    OptimizerState,
    Statistics,
    Subject,
    case_study,
    one_pass,
    summarize_case_study,
    verdicts,
)


class Batch(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor


def trained_statistics(model: nn.Module, target: str, inputs: torch.Tensor, layout: str) -> tuple[Statistics, dict]:
    """Statistics of ``target`` over a few training calls, through a real Inhibitor (then removed)."""
    inserted = memel.inhibit(model, [target], memel.InhibitionConfig(mode="original", layout=layout, kernel="eager"))
    model.train()
    with torch.no_grad():
        for chunk in inputs.split(8):
            model(chunk)
    memel.sync(model)
    found = inserted[target].statistics()
    state = copy.deepcopy(inserted[target].state_dict())
    memel.remove(model)
    return Statistics(found["mean"].reshape(-1).double(), found["var"].reshape(-1).double(), layout), state


# ------------------------------------------------------------------------------ the modification
@pytest.mark.parametrize("layout", ["channel", "element"])
@pytest.mark.parametrize("mode", ["naive_a", "naive_b", "rd"])
def test_the_modifier_is_the_inhibitor(mode: str, layout: str) -> None:
    """Top-n choice, forward values and input gradient equal memel.Inhibitor's on the same statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(5, 6), act=nn.GELU(), out=nn.Linear(6, 2))).double()
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    stats, state = trained_statistics(model, "act", torch.randn(40, 3, 5, dtype=torch.float64), layout)
    config = memel.InhibitionConfig(
        mode=mode, layout=layout, late_start=0, top_n=2, kernel="eager", strength=2.0 if mode == "rd" else 1.0
    )

    def run(modify: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = model.fc(x).detach().requires_grad_(True)
        if modify:
            inhibitor = memel.Inhibitor(config)
            inhibitor.load_state_dict(state)
            inhibitor.train()
            out = inhibitor(model.act(h))
        else:
            holder = nn.Sequential(OrderedDict(act=nn.GELU()))
            modifier = Modifier(holder, {"act": stats}, mode, 2.0, 2, 0.01)
            out = holder(h)
            modifier.remove()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        return out.detach(), h.grad

    expected_out, expected_grad = run(True)
    got_out, got_grad = run(False)
    torch.testing.assert_close(got_out, expected_out)
    torch.testing.assert_close(got_grad, expected_grad)
    changed = (got_out != model.act(model.fc(x))).reshape(stats.rows(got_out).shape).sum(1)
    assert (changed == 2).all()  # top_n = 2 values modified per sample row


def test_random_selection_modifies_as_many_other_values() -> None:
    torch.manual_seed(1)
    holder = nn.Sequential(OrderedDict(act=nn.Identity()))
    stats = Statistics(torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64), "element")
    x = torch.randn(64, 10, dtype=torch.float64)
    chosen = {}
    for selection in ("top_ms", "random"):
        modifier = Modifier(
            holder, {"act": stats}, "naive_a", 1.0, 1, 0.01, selection, torch.Generator().manual_seed(0)
        )
        out = holder(x)
        modifier.remove()
        assert ((out != x).sum(1) == 1).all()
        chosen[selection] = modifier.chosen["act"].flatten()
    assert torch.equal(chosen["top_ms"], x.abs().argmax(1))
    assert (chosen["random"] != chosen["top_ms"]).float().mean() > 0.7  # about 9 in 10 differ by chance


# ------------------------------------------------------------------------------ known answers
def linear_subject(target_rule: str, lr: float) -> tuple[Subject, dict[int, Batch], callable]:
    """z = W x with orthonormal inputs (one per sample), loss 0.5 * mean over samples of |out - t|^2.

    At the chosen value out = mean, so its gradient is g = (mean - t) / B: with t = z (``towards``)
    -g points from the mean to z for every chosen value (alignment 1); with t = 2 mean - z (``away``)
    it points the other way (alignment 0). Inputs are orthonormal and W has no bias, so one SGD step
    moves each chosen value by -lr/B times its own gradient only: phi(z')/phi(z) = (1 -+ lr/B)^2."""
    torch.manual_seed(3)
    batch_size, neurons = 6, 5
    model = nn.Sequential(OrderedDict(lin=nn.Linear(batch_size, neurons, bias=False))).double()
    x = torch.eye(batch_size, dtype=torch.float64)
    mean = torch.full((neurons,), 0.1, dtype=torch.float64)
    stats = Statistics(mean, torch.ones(neurons, dtype=torch.float64), "element")
    with torch.no_grad():
        z = model(x)
    target = z.clone() if target_rule == "towards" else 2 * mean - z

    def loss_fn(m: nn.Module, batch: Batch) -> torch.Tensor:
        return 0.5 * (m(batch.inputs) - batch.targets).square().sum(1).mean()

    subject = Subject(model, OptimizerState(lr=lr, kind="sgd"), {"lin": stats}, strength=1.0, top_n=1, eps=0.0)
    return subject, {0: Batch(x, target)}, loss_fn


@pytest.mark.parametrize(("rule", "expected"), [("towards", 1.0), ("away", 0.0)])
def test_alignment_diagnostic_is_known(rule: str, expected: float) -> None:
    subject, batches, loss_fn = linear_subject(rule, lr=0.3)
    rows = case_study(subject, batches, loss_fn, selections=("top_ms",)).set_index("mode")
    for mode in ("naive_a", "naive_b", "rd"):  # all three output the mean there: the same gradient
        assert rows.loc[mode, "alignment"] == expected
        assert rows.loc[mode, "alignment_weighted"] == expected
    assert np.isnan(rows.loc["original", "alignment"])


def test_decrease_and_update_ratios_have_their_closed_form() -> None:
    lr, batch_size = 0.3, 6
    subject, batches, loss_fn = linear_subject("towards", lr)
    with torch.no_grad():
        z = subject.model(batches[0].inputs)
    mean = subject.stats["lin"].mean
    chosen = (z - mean).square().argmax(1)
    zc, mc = z.gather(1, chosen[:, None]).flatten(), mean[chosen]
    rows = case_study(subject, batches, loss_fn, selections=("top_ms",)).set_index("mode")
    step = lr / batch_size
    # rd: dL/dz = -g = (z - mean)/B, so z' - mean = (z - mean)(1 - lr/B); naive_b the opposite
    for mode, factor in (("rd", 1 - step), ("naive_b", 1 + step)):
        z_new = mc + (zc - mc) * factor
        assert rows.loc[mode, "decrease_ratio"] == pytest.approx(100 * (1 - factor**2), rel=1e-9)
        assert rows.loc[mode, "update_ratio"] == pytest.approx(float(100 * (z_new / zc - 1).abs().mean()), rel=1e-9)
        assert rows.loc[mode, "quotient"] == pytest.approx(
            rows.loc[mode, "decrease_ratio"] / rows.loc[mode, "update_ratio"]
        )
    # original (out = z = target) and naive_a (no gradient through the mean) do not move anything
    for mode in ("original", "naive_a"):
        assert rows.loc[mode, "decrease_ratio"] == 0 and rows.loc[mode, "update_ratio"] == 0
    assert rows.loc["rd", "decrease_ratio"] > 0 > rows.loc["naive_b", "decrease_ratio"]  # Lemma 3.3 when aligned
    assert (rows["selected"] == batch_size).all()  # top-1 per sample


#: How each mode passes a chosen value on: forward value mu, gradient times s.
GRADIENT_SCALE = {"original": None, "naive_a": 0.0, "naive_b": 1.0, "rd": -1.0}


def _reproduce(
    model: nn.Module, mean: np.ndarray, var: np.ndarray, batch: Batch, mode: str, lr: float
) -> dict[str, float]:
    """The procedure by hand: autograd, the mode as a hook, SGD by hand, phi and the ratios in NumPy."""
    model = copy.deepcopy(model)
    denominator = var + 0.01 * var.mean()
    with torch.no_grad():
        z = model.act(model.fc1(batch.inputs)).numpy()
    phi = (z - mean) ** 2 / denominator
    chosen = np.zeros_like(phi, dtype=bool)
    chosen[np.arange(len(phi)), phi.argmax(1)] = True
    scale, handle = GRADIENT_SCALE[mode], None
    if scale is not None:
        mask, mu = torch.from_numpy(chosen), torch.from_numpy(mean)
        handle = model.act.register_forward_hook(
            lambda _m, _a, out: torch.where(mask, scale * out + (mu - scale * out).detach(), out)
        )
    nn.functional.cross_entropy(model(batch.inputs), batch.targets).backward()
    if handle is not None:
        handle.remove()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
        z_new = model.act(model.fc1(batch.inputs)).numpy()
    phi_new = (z_new - mean) ** 2 / denominator
    return {
        "decrease_ratio": 100 * np.mean(1 - phi_new[chosen] / phi[chosen]),
        "decrease_ratio_pooled": 100 * (1 - phi_new[chosen].sum() / phi[chosen].sum()),
        "update_ratio": 100 * np.mean(np.abs(z_new[chosen] / z[chosen] - 1)),
        "update_ratio_all": 100 * np.mean(np.abs(z_new / z - 1)),
    }


def test_ratios_match_an_independent_reproduction() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(6, 16), act=nn.GELU(), fc2=nn.Linear(16, 3))).double()
    stats, _ = trained_statistics(model, "act", torch.randn(48, 6, dtype=torch.float64), "channel")
    batches = {
        s: Batch(
            torch.randn(24, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(s)),
            torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(s + 100)),
        )
        for s in range(3)
    }
    subject = Subject(model, OptimizerState(lr=0.5, kind="sgd"), {"act": stats}, top_n=1, eps=0.01)
    reference = copy.deepcopy(model.state_dict())

    def loss_fn(m: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch.inputs), batch.targets)

    per_batch = case_study(subject, batches, loss_fn, selections=("top_ms",))
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())  # restored afterwards
    for row in per_batch.itertuples():
        expected = _reproduce(model, stats.mean.numpy(), stats.var.numpy(), batches[row.batch], row.mode, 0.5)
        for column, value in expected.items():
            assert getattr(row, column) == pytest.approx(value, rel=1e-9, abs=1e-12), (row.mode, column)
    assert len({round(v, 9) for v in per_batch[per_batch["batch"] == 0]["decrease_ratio"]}) == 4


def test_adamw_state_is_loaded_and_stepped() -> None:
    """A step from saved AdamW moments equals continuing the optimizer that made them."""
    torch.manual_seed(5)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(4, 8), act=nn.Tanh(), fc2=nn.Linear(8, 2))).double()
    live = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    for _ in range(3):
        live.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        live.step()
    names = dict(model.named_parameters())
    saved = OptimizerState(lr=1e-2, weight_decay=0.1, state={n: copy.deepcopy(live.state[p]) for n, p in names.items()})
    replica = copy.deepcopy(model)
    live.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    live.step()
    rebuilt = saved.build(replica)
    rebuilt.zero_grad()
    nn.functional.mse_loss(replica(x), y).backward()
    rebuilt.step()
    for (name, p), q in zip(model.named_parameters(), replica.parameters(), strict=True):
        torch.testing.assert_close(q, p, msg=name)


# ------------------------------------------------------------------------------ pure noise
def test_paired_intervals_cover_zero_on_pure_noise() -> None:
    """Modes that differ by noise alone: the paired 95% CIs include 0 in about 95% of repetitions."""
    rng = np.random.default_rng(7)
    covered, verdict_counts = 0, {"reproduced": 0, "contradicted": 0, "inconclusive": 0}
    repetitions = 200
    for _ in range(repetitions):
        rows = [
            {
                "variant": "shared",
                "lr_name": "run",
                "lr": 1e-3,
                "selection": "top_ms",
                "mode": mode,
                "batch": b,
                **{
                    c: rng.normal(0.5, 1.0)
                    for c in (
                        "decrease_ratio",
                        "decrease_ratio_pooled",
                        "update_ratio",
                        "update_ratio_all",
                        "quotient",
                        "alignment",
                        "alignment_weighted",
                    )
                },
            }
            for b in range(50)
            for mode in MODES
        ]
        per_batch = pd.DataFrame(rows)
        summary = summarize_case_study(per_batch).set_index("mode")
        low, high = (
            summary.loc["rd", "decrease_ratio_vs_original_ci_low"],
            summary.loc["rd", "decrease_ratio_vs_original_ci_high"],
        )
        covered += low <= 0 <= high
        for verdict in verdicts(per_batch)["verdict"]:
            verdict_counts[verdict] += 1
    assert 0.90 <= covered / repetitions <= 0.99
    total = sum(verdict_counts.values())
    assert verdict_counts["inconclusive"] / total >= 0.9


def test_no_effect_gives_zero_differences() -> None:
    """A target the loss does not depend on: every mode's step is the same, all paired differences are 0."""
    torch.manual_seed(2)
    model = nn.Sequential(OrderedDict(lin=nn.Linear(3, 4), out=nn.Linear(4, 1))).double()
    with torch.no_grad():
        model.out.weight.zero_()
    stats = Statistics(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64), "element")
    subject = Subject(model, OptimizerState(lr=0.1, kind="sgd"), {"lin": stats})
    batches = {
        s: Batch(torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)) for s in range(4)
    }
    per_batch = case_study(subject, batches, lambda m, b: (m(b.inputs) - b.targets).square().mean())
    summary = summarize_case_study(per_batch)
    assert (summary["decrease_ratio_vs_original"].dropna() == 0).all()
    assert set(verdicts(per_batch)["verdict"]) == {"inconclusive"}


def test_one_pass_leaves_no_hooks() -> None:
    subject, batches, loss_fn = linear_subject("towards", 0.1)
    one_pass(subject.model, subject.weights, subject.optimizer, subject.stats, batches[0], 0, loss_fn, "rd")
    assert not subject.model.lin._forward_hooks


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--case-lr", "abc"], r"--case-lr: got 'abc'; allowed: run .* or a finite number > 0"),
        (["--case-lr", "-1e-3"], r"--case-lr: got '-1e-3'"),
        (["--case-batches", "1"], r"--case-batches: got 1; must be >= 2"),
        (["--case-optimizer", "adam"], r"--case-optimizer: got 'adam'; allowed: run .*, sgd"),
    ],
)
def test_bad_case_options_are_refused_by_name(args: list[str], expected: str, tmp_path) -> None:
    import re

    from typer.testing import CliRunner

    from memel.cli import app

    result = CliRunner(env={"COLUMNS": "240"}).invoke(
        app, ["analyze", str(tmp_path), "--out", str(tmp_path / "out"), *args]
    )
    assert result.exit_code == 2 and re.search(expected, " ".join(result.output.split())), result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
