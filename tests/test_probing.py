"""Figure 2 by probing on constructed data with a known answer: a byte LM with one neuron wired to
fire on "code" bytes (the probe must find it; its mean-ablation must hurt code tokens only), the
same model with random group labels (AUROC ~ 0.5, no group effect), AUROC and % loss increase
against independent computations, and per-token document labels of LM windows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from memel.analysis.ablation import ablate, lm_batches
from memel.analysis.probing import TokenBatch, auroc, mlp_modules, probe
from memel.data.documents import Document
from memel.data.text_lm import TextLMLoader
from memel.data.tokenizers import make_tokenizer

PROSE, CODE = 0, 128  # two 64-byte alphabets
PLANTED, HIDDEN, WINDOW = 5, 8, 32


def _next(byte: np.ndarray) -> np.ndarray:
    base = np.where(byte >= CODE, CODE, PROSE)
    return base + (byte - base + 1) % 64


class PlantedLM(nn.Module):
    """logits = direct[x] + down(GELU(up[x])): a bigram model whose neuron ``PLANTED`` is +3 on code
    bytes and about 0 on prose bytes, and raises the logits of every code byte by 3 per unit."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.direct = nn.Embedding(256, 256)
        self.up = nn.Embedding(256, HIDDEN)
        self.mlp = nn.ModuleDict({"act": nn.GELU()})
        self.down = nn.Linear(HIDDEN, 256, bias=False)
        with torch.no_grad():
            self.direct.weight.zero_()
            prose, code = torch.arange(PROSE, PROSE + 64), torch.arange(CODE, CODE + 64)
            self.direct.weight[prose, torch.from_numpy(_next(prose.numpy()))] = 3.0
            self.direct.weight[prose.unsqueeze(1), code] = -10.0  # prose never continues with code
            self.direct.weight[code, torch.from_numpy(_next(code.numpy()))] = 4.0
            self.up.weight.copy_(torch.randn(256, HIDDEN, generator=generator))
            self.up.weight[:, PLANTED] = -3.0
            self.up.weight[code, PLANTED] = 3.0
            self.down.weight.copy_(0.05 * torch.randn(256, HIDDEN, generator=generator))
            self.down.weight[:, PLANTED] = 0.0
            self.down.weight[code, PLANTED] = 3.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # float64 weights: comparable to the reference to 1e-9
        return self.direct(ids) + self.down(self.mlp["act"](self.up(ids)))


def _windows(count: int, seed: int, code_share: float = 0.1) -> np.ndarray:
    """``[count, WINDOW + 1]`` token chains; each window is prose or (with ``code_share``) code,
    switching alphabet once at a random point in a quarter of the windows."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((count, WINDOW + 1), np.int64)
    for row in rows:
        alphabet = CODE if rng.random() < code_share else PROSE
        switch = rng.integers(1, WINDOW) if rng.random() < 0.25 else WINDOW + 1
        row[0] = alphabet + rng.integers(64)
        for t in range(1, WINDOW + 1):
            row[t] = _next(row[t - 1 : t])[0]
            if t == switch:
                row[t] = (PROSE if alphabet == CODE else CODE) + rng.integers(64)
    return rows


def _batches(seed: int, count: int = 16, size: int = 16, labels: str = "code") -> list[TokenBatch]:
    rng = np.random.default_rng(seed + 100)
    out = []
    for index in range(count):
        rows = torch.from_numpy(_windows(size, seed * 1000 + index))
        targets = rows[:, 1:]
        if labels == "code":
            marked = rows >= CODE
        else:
            marked = torch.from_numpy(rng.random(rows.shape) < 0.3)
        out.append(TokenBatch(rows[:, :-1], targets, marked[:, 1:], marked[:, :-1]))
    return out


def _reference_pct(
    model: PlantedLM, probe_batches: list[TokenBatch], eval_batches: list[TokenBatch], neuron: int
) -> tuple[float, float]:
    """% loss increase on code / other tokens, by hand in float64: the neuron's mean over the probe
    tokens, logits rebuilt from the weights, log-softmax cross-entropy."""
    direct, up, down = (w.detach().double() for w in (model.direct.weight, model.up.weight, model.down.weight))
    gelu = lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5))  # noqa: E731 - exact GELU
    probe_inputs = torch.cat([b.inputs.reshape(-1) for b in probe_batches])
    mean = gelu(up[probe_inputs, neuron]).mean()
    totals = np.zeros((2, 2))
    for batch in eval_batches:
        ids, targets, mask = batch.inputs.reshape(-1), batch.targets.reshape(-1), batch.in_group.reshape(-1)
        hidden = gelu(up[ids])
        for column, h in enumerate(
            (hidden, torch.cat([hidden[:, :neuron], mean.expand(len(ids), 1), hidden[:, neuron + 1 :]], 1))
        ):
            logits = direct[ids] + h @ down.T
            nll = -(logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, 1))
            totals[column] += [float(nll[mask].sum()), float(nll[~mask].sum())]
    base, ablated = totals
    return tuple(100 * (ablated - base) / base)


def test_auroc_matches_scikit_learn_with_ties() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(500) < 0.3
    values = np.column_stack(
        [
            rng.standard_normal(500) + labels,
            rng.integers(0, 4, 500),
            -labels.astype(float) + 0.1 * rng.standard_normal(500),
        ]
    )
    expected = [roc_auc_score(labels, values[:, i]) for i in range(3)]
    assert auroc(values, labels) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="needs both classes"):
        auroc(values, np.zeros(500, bool))


def test_probe_finds_the_planted_code_neuron() -> None:
    model = PlantedLM().double()
    found = probe(model, mlp_modules(model, ["mlp.act"]), _batches(0))
    assert (found.best.module, found.best.index) == ("mlp.act", PLANTED)
    assert found.best_auroc > 0.99
    others = found.table.drop(index=PLANTED)["auroc"]
    assert others.max() < 0.9 and found.tokens == 16 * 16 * WINDOW and 0.05 < found.group_tokens / found.tokens < 0.3


def test_ablating_the_planted_neuron_hurts_code_only_and_matches_a_hand_computation() -> None:
    model = PlantedLM().double()
    probe_batches, eval_batches = _batches(0), _batches(1)
    result = ablate(model, ["mlp.act"], probe_batches, eval_batches, "code", draws=7, seed=0, resamples=400)
    rows = result.rows.set_index("group")
    assert [(n.module, n.index) for n in result.chosen] == [("mlp.act", PLANTED)]
    code, other, difference = rows.loc["code"], rows.loc["other"], rows.loc["difference"]
    expected_code, expected_other = _reference_pct(model, probe_batches, eval_batches, PLANTED)
    assert code["increase_pct"] == pytest.approx(expected_code, rel=1e-9)
    assert other["increase_pct"] == pytest.approx(expected_other, rel=1e-9, abs=1e-9)
    assert code["increase_pct"] > 5 and code["increase_pct_ci_low"] > 3  # the group's loss rises
    # the rest is not hurt (its only affected tokens are the first prose bytes after code, which the code boost mispredicted)
    assert -1 < other["increase_pct"] < 0.05 and other["increase_pct_ci_high"] < code["increase_pct_ci_low"]
    assert difference["increase_pct_ci_low"] > 3
    assert code["random_draws"] == 7 and abs(code["random_increase_pct_mean"]) < 1 and code["random_at_least_pct"] == 0
    assert code["tokens"] + other["tokens"] == difference["tokens"] == 16 * 16 * WINDOW


def test_random_labels_give_chance_auroc_and_no_group_effect() -> None:
    model = PlantedLM().double()
    probe_batches, eval_batches = _batches(0, labels="random"), _batches(1, labels="random")
    found = probe(model, ["mlp.act"], probe_batches)
    assert abs(found.best_auroc - 0.5) < 0.03 and found.table["auroc"].between(0.45, 0.55).all()
    rows = ablate(
        model, ["mlp.act"], probe_batches, eval_batches, "noise", draws=5, seed=2, resamples=400
    ).rows.set_index("group")
    expected_group, expected_other = _reference_pct(model, probe_batches, eval_batches, found.best.index)
    assert rows.loc["noise", "increase_pct"] == pytest.approx(expected_group, rel=1e-9, abs=1e-9)
    assert rows.loc["other", "increase_pct"] == pytest.approx(expected_other, rel=1e-9, abs=1e-9)
    differences, covered = [], 0
    for seed in range(10):  # the group-minus-other effect's 95% CI holds 0 on noise (about 19 draws in 20)
        probe_batches, eval_batches = _batches(10 + 2 * seed, labels="random"), _batches(11 + 2 * seed, labels="random")
        row = ablate(model, ["mlp.act"], probe_batches, eval_batches, "noise", draws=2, seed=seed, resamples=400).rows
        difference = row.set_index("group").loc["difference"]
        covered += difference["increase_pct_ci_low"] <= 0 <= difference["increase_pct_ci_high"]
        differences.append(difference["increase_pct"])
    assert covered >= 8 and abs(np.mean(differences)) < 0.1


def test_every_target_token_carries_its_documents_label() -> None:
    docs = [
        Document("a", "a", 5, "prose", data=b"aaaaa"),
        Document("b", "b", 4, "code", data=b"bbbb"),
        Document("c", "c", 3, "prose", data=b"ccc"),
    ]
    loader = TextLMLoader(docs, make_tokenizer("bytes"), 3, 2, shuffle=False)
    assert loader.stream.label_names == ["code", "prose"]
    indices = np.arange(loader.num_examples())
    targets = loader.fetch(indices).targets.numpy()
    labels = loader.window_labels(indices)[:, 1:]
    expected = {ord("a"): "prose", ord("b"): "code", ord("c"): "prose", ord("\n"): None}
    stream = b"aaaaa\n\nbbbb\n\nccc"
    for window, row in enumerate(targets):
        for t, byte in enumerate(row):
            position = window * 3 + 1 + t
            owner = expected[int(byte)] or expected[next(c for c in stream[position:] if c != ord("\n"))]
            assert loader.stream.label_names[labels[window, t]] == owner


def test_lm_batches_mark_python_code_tokens_of_the_mixed_corpus() -> None:
    data = {"kind": "text_lm", "corpus": "mixed", "seq_len": 64}
    batches = lm_batches(data, 4, 6, "python-code")
    assert len(batches) == 6
    marked = torch.cat([b.in_group.reshape(-1) for b in batches]).float().mean()
    assert 0.2 < float(marked) < 0.9  # both groups present in the evenly spread held-out windows
    for batch in batches:  # a code token of the stdlib is ASCII; Shakespeare's text has no "def "/"self." lines in it
        assert batch.targets.shape == batch.in_group.shape == (4, 64)
    with pytest.raises(ValueError, match="no 'klingon' tokens"):
        lm_batches(data, 4, 6, "klingon")
    with pytest.raises(ValueError, match="kind text_lm"):
        lm_batches({"kind": "digits"}, 4, 6, "python-code")


def test_summary_over_seeds_and_size_trend_match_numpy() -> None:
    from scipy import stats as scipy_stats

    from memel.analysis.pipeline import summarize_ablation

    rng = np.random.default_rng(0)
    rows = []
    for n_params in (1e4, 1e5, 1e6):
        for seed in range(3):
            for group, slope in (("python-code", -2.0), ("other", 0.0), ("difference", -2.0)):
                value = 10 + slope * np.log10(n_params) + rng.normal(0, 0.1 if group != "other" else 1.0)
                rows.append(
                    {
                        "model": f"m{int(n_params)}",
                        "n_params": int(n_params),
                        "label": "original",
                        "mode": "original",
                        "strength": 1.0,
                        "top_n": 1,
                        "seed": seed,
                        "group": group,
                        "increase_pct": value,
                        "random_increase_pct_mean": value / 10,
                        "random_increase_pct_std": 0.1,
                        "auroc": 0.9,
                        "base_loss": 2.0,
                        "tokens": 100,
                    }
                )
    frame = pd.DataFrame(rows)
    summary = summarize_ablation(frame).set_index(["group", "n_params"])
    for (group, n_params), part in frame.groupby(["group", "n_params"]):
        values = part["increase_pct"].to_numpy()
        half = scipy_stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
        row = summary.loc[(group, n_params)]
        assert row["increase_pct_mean"] == pytest.approx(values.mean()) and row["increase_pct_n"] == 3
        assert (row["increase_pct_ci_low"], row["increase_pct_ci_high"]) == pytest.approx(
            (values.mean() - half, values.mean() + half)
        )
        assert row["random_increase_pct_mean"] == pytest.approx(values.mean() / 10)
    for group in ("python-code", "other"):
        part = frame[frame["group"] == group]
        slope = np.polyfit(np.log10(part["n_params"]), part["increase_pct"], 1)[0]
        assert summary.loc[(group, 1e4), "trend_slope"] == pytest.approx(slope)
        excess = part["increase_pct"] - part["random_increase_pct_mean"]
        assert summary.loc[(group, 1e4), "excess_trend_slope"] == pytest.approx(
            np.polyfit(np.log10(part["n_params"]), excess, 1)[0]
        )
    code, other = summary.loc[("python-code", 1e4)], summary.loc[("other", 1e4)]
    assert code["excess_pct_mean"] == pytest.approx(0.9 * code["increase_pct_mean"])
    assert code["trend_ci_high"] < 0 and code["trend_slope"] == pytest.approx(-2, abs=0.2)  # planted shrinking effect
    assert other["trend_ci_low"] <= 0 <= other["trend_ci_high"]  # no trend planted: the CI holds 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--probe-neurons", "0"], "error: --probe-neurons: got 0; must be >= 1"),
        (["--control-draws", "1"], "error: --control-draws: got 1; must be >= 2"),
        (["--ablation-batches", "1"], "error: --ablation-batches: got 1; must be >= 2"),
        (["--probe-group", " "], "error: --probe-group: empty"),
    ],
)
def test_bad_ablation_options_are_refused_naming_the_option(args: list[str], message: str, tmp_path) -> None:
    from typer.testing import CliRunner

    from memel.cli import app

    result = CliRunner(env={"COLUMNS": "240"}).invoke(
        app, ["analyze", str(tmp_path), "--out", str(tmp_path / "out"), *args]
    )
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
