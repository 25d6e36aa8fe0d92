"""Metric validation: does the Monosemantic Scale find the neurons that really are feature-specific?

A small MLP (``input_dim -> hidden -> ReLU -> num_features``, an Inhibitor after the ReLU) learns to
read the multi-hot feature vector of the planted-feature data (``sparse_features``) with BCE. On
held-out samples it is then judged in two ways (issue #8, item 3):

* **Flagged neurons against an independent truth.** MS flags a neuron when its values exceed
  ``ms_threshold`` (MS > 36: six standard deviations) on at least ``min_fraction`` (0.5%) of the
  held-out samples (the criterion of ``memel analyze``'s monosemantic ratio, calibrated against
  featureless neurons: see ``docs/monosemanticity.md``), with phi from
  ``Inhibitor.monosemantic_scale`` (the trained statistics). The truth never looks at MS: a neuron is
  *feature-specific* when the AUROC of its activation for some feature (inputs that carry the feature
  against inputs that do not) is >= ``auroc_threshold``, and *single-feature* when exactly one feature
  reaches it. Reported: precision, recall, F1, the base rate (the precision of a random flagged set of
  the same size) and the AUROC of ``frac_above`` as a ranking of the truth (threshold-free).
* **False Killing Rate** (arXiv 2503.23298): among the values selected for inhibition, the fraction
  whose input lacks the neuron's best-matching feature, i.e. the feature with the largest mean
  (z - mu)^2 / S^2 over the inputs that carry it. For a fixed neuron the denominator is one positive
  constant, so the argmax is the same with S^2 = var and with phi's var + eps*mean(var): phi is used.
  Selections at each inhibition fraction p: a global threshold at the (1 - p) quantile of phi over all
  held-out values (what ``select="threshold"`` converges to), per-sample top-n with n = round(p * H)
  (at least 1), and the expected FKR of uniformly random values (the same for every p).

Every piece is a small pure NumPy function; :func:`bench_metric` puts them together. The best-matching
feature is chosen on the same held-out values the FKR is measured on (about 400 carriers per feature
at the defaults, so the in-sample argmax is stable).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn

import memel
from memel.errors import ConfigError

DEFAULT_FRACTIONS = (0.01, 0.02, 0.03, 0.05)


# ------------------------------------------------------------------------------------------------
# pure pieces


def _as_2d(name: str, array: object, rows: int | None = None) -> np.ndarray:
    out = np.asarray(array)
    if out.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array, got shape {out.shape}")
    if rows is not None and out.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows (one per input), got {out.shape[0]}")
    return out


def feature_specificity(acts: np.ndarray, features: np.ndarray) -> np.ndarray:
    """AUROC ``[H, F]`` of each neuron's activation ``acts[:, h]`` as a score for ``features[:, f]``.

    Computed from average ranks (the Mann-Whitney U statistic), equal to scikit-learn's
    ``roc_auc_score(features[:, f], acts[:, h])``: 1 when the neuron is higher on every input
    with the feature, 0.5 for a constant neuron (all ties), below 0.5 when the feature lowers it.
    A feature carried by every input or by none has no AUROC: its column is NaN.
    """
    acts = _as_2d("acts", acts).astype(np.float64)
    labels = _as_2d("features", features, acts.shape[0]).astype(np.float64)
    if acts.shape[0] == 0:
        raise ValueError("acts: no inputs")
    ranks = rankdata(acts, axis=0)  # ties get their average rank
    positives = labels.sum(0)
    negatives = labels.shape[0] - positives
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc = (ranks.T @ labels - positives * (positives + 1) / 2) / (positives * negatives)
    auroc[:, (positives == 0) | (negatives == 0)] = np.nan
    return auroc


def specific_neurons(auroc: np.ndarray, threshold: float = 0.85, single: bool = False) -> np.ndarray:
    """Bool ``[H]``: the neurons with some feature's AUROC >= ``threshold`` (``single``: exactly one
    such feature). NaN AUROCs (features without both classes) never count."""
    reached = np.nan_to_num(np.asarray(auroc, dtype=np.float64), nan=-np.inf) >= threshold
    counts = reached.sum(1)
    return counts == 1 if single else counts >= 1


def fraction_above(phi: np.ndarray, ms_threshold: float = 9.0) -> np.ndarray:
    """``[H]``: per neuron, the fraction of inputs with phi strictly above ``ms_threshold`` (the
    snapshot's ``frac_above``)."""
    phi = _as_2d("phi", phi)
    return (phi > ms_threshold).mean(0)


def flagged(frac_above: np.ndarray, min_fraction: float | None = None, top_fraction: float | None = None) -> np.ndarray:
    """Bool ``[H]``: the neurons MS flags. Exactly one criterion: ``min_fraction`` flags every neuron
    with ``frac_above >= min_fraction`` (and > 0); ``top_fraction`` flags the ceil(top_fraction * H)
    neurons with the largest ``frac_above`` (ties broken by the lower index)."""
    frac_above = np.asarray(frac_above, dtype=np.float64)
    if (min_fraction is None) == (top_fraction is None):
        raise ValueError("flagged: give exactly one of min_fraction and top_fraction")
    if min_fraction is not None:
        return (frac_above >= min_fraction) & (frac_above > 0)
    assert top_fraction is not None
    if not 0.0 <= top_fraction <= 1.0:
        raise ValueError(f"top_fraction: got {top_fraction!r}; must be in [0, 1]")
    count = math.ceil(top_fraction * frac_above.size - 1e-9)
    out = np.zeros(frac_above.size, dtype=bool)
    out[np.argsort(-frac_above, kind="stable")[:count]] = True
    return out


@dataclass(frozen=True)
class PrecisionRecall:
    """Flagged neurons scored against the truth. Undefined ratios (0/0) are NaN."""

    flagged: int
    truth: int
    true_positives: int
    neurons: int
    precision: float
    recall: float
    f1: float
    base_rate: float  # truth / neurons: the expected precision of a random flagged set


def precision_recall(flagged: np.ndarray, truth: np.ndarray) -> PrecisionRecall:
    flagged = np.asarray(flagged, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if flagged.shape != truth.shape:
        raise ValueError(f"flagged and truth differ in shape: {flagged.shape} and {truth.shape}")
    tp, n_flagged, n_truth = int((flagged & truth).sum()), int(flagged.sum()), int(truth.sum())
    precision = tp / n_flagged if n_flagged else math.nan
    recall = tp / n_truth if n_truth else math.nan
    f1 = 2 * tp / (n_flagged + n_truth) if n_flagged + n_truth else math.nan
    base = n_truth / truth.size if truth.size else math.nan
    return PrecisionRecall(n_flagged, n_truth, tp, truth.size, precision, recall, f1, base)


def best_matching_feature(deviation: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Int ``[H]``: per neuron, the feature f with the largest mean of ``deviation`` ((z - mu)^2 / S^2,
    or phi) over the inputs that carry f; features carried by no input are never chosen; ties go to
    the lower index. Scaling a neuron's column by a positive constant does not change its answer."""
    deviation = _as_2d("deviation", deviation).astype(np.float64)
    labels = _as_2d("features", features, deviation.shape[0]).astype(np.float64)
    carriers = labels.sum(0)
    if not (carriers > 0).any():
        raise ValueError("features: no input carries any feature, so no neuron has a best-matching feature")
    with np.errstate(divide="ignore", invalid="ignore"):
        means = (deviation.T @ labels) / carriers  # [H, F]
    means[:, carriers == 0] = -np.inf
    return np.argmax(means, axis=1)


def false_killing_rate(selected: np.ndarray, features: np.ndarray, best: np.ndarray) -> float:
    """Among the selected (input, neuron) values, the fraction whose input lacks the neuron's
    best-matching feature (``features[n, best[h]] == 0``); NaN when nothing is selected."""
    selected = _as_2d("selected", selected).astype(bool)
    labels = _as_2d("features", features, selected.shape[0]).astype(bool)
    best = np.asarray(best, dtype=np.int64)
    if best.shape != (selected.shape[1],):
        raise ValueError(f"best: expected one feature per neuron ({selected.shape[1]}), got shape {best.shape}")
    total = int(selected.sum())
    if total == 0:
        return math.nan
    carries = labels[:, best]  # [N, H]: input n carries neuron h's best-matching feature
    return float((selected & ~carries).sum() / total)


def random_false_killing_rate(features: np.ndarray, best: np.ndarray) -> float:
    """The expected FKR of values selected uniformly at random (at any fraction): the fraction of all
    (input, neuron) values whose input lacks the neuron's best-matching feature."""
    labels = _as_2d("features", features).astype(bool)
    return float(1.0 - labels[:, np.asarray(best, dtype=np.int64)].mean())


def threshold_selection(phi: np.ndarray, fraction: float) -> tuple[np.ndarray, float]:
    """(mask, tau): every value with phi >= tau, where tau is the k-th largest phi and
    k = max(1, round(fraction * phi.size)), i.e. the (1 - fraction) quantile of phi over all values
    (ties at tau are all selected, as a threshold does)."""
    phi = _as_2d("phi", phi)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: got {fraction!r}; must be in (0, 1)")
    flat = phi.reshape(-1)
    k = max(1, round(fraction * flat.size))
    tau = float(np.partition(flat, flat.size - k)[flat.size - k])
    return phi >= tau, tau


def top_n_for(fraction: float, neurons: int) -> int:
    """The per-sample n whose share n / neurons is closest to ``fraction`` (at least 1)."""
    return min(neurons, max(1, round(fraction * neurons)))


def top_n_selection(phi: np.ndarray, n: int) -> np.ndarray:
    """Mask of the n largest phi of every input (row), as the Inhibitor's per-sample top-n."""
    phi = _as_2d("phi", phi)
    if not 1 <= n <= phi.shape[1]:
        raise ValueError(f"n: got {n!r}; must be in [1, {phi.shape[1]}]")
    index = np.argpartition(-phi, n - 1, axis=1)[:, :n]
    mask = np.zeros(phi.shape, dtype=bool)
    np.put_along_axis(mask, index, True, axis=1)
    return mask


@dataclass(frozen=True)
class FkrRow:
    fraction: float
    tau: float  # the global threshold on phi
    threshold_share: float  # fraction of values the threshold selected (ties can add a few)
    threshold_fkr: float
    top_n: int
    top_n_share: float  # n / H
    top_n_fkr: float
    random_fkr: float


def fkr_table(phi: np.ndarray, features: np.ndarray, best: np.ndarray, fractions: Iterable[float]) -> list[FkrRow]:
    """FKR of threshold, per-sample top-n and random selection at each inhibition fraction."""
    phi = _as_2d("phi", phi)
    chance = random_false_killing_rate(features, best)
    rows = []
    for fraction in fractions:
        mask, tau = threshold_selection(phi, fraction)
        n = top_n_for(fraction, phi.shape[1])
        top = top_n_selection(phi, n)
        rows.append(
            FkrRow(
                fraction=fraction,
                tau=tau,
                threshold_share=float(mask.mean()),
                threshold_fkr=false_killing_rate(mask, features, best),
                top_n=n,
                top_n_share=n / phi.shape[1],
                top_n_fkr=false_killing_rate(top, features, best),
                random_fkr=chance,
            )
        )
    return rows


@dataclass(frozen=True)
class Validation:
    """What :func:`validate` measures on one set of held-out activations."""

    frac_above: np.ndarray  # [H]
    auroc: np.ndarray  # [H, F]
    best: np.ndarray  # [H]
    flagged: np.ndarray  # [H] bool
    specific: PrecisionRecall  # truth: max AUROC >= threshold
    single: PrecisionRecall  # truth: exactly one feature with AUROC >= threshold
    rank_auroc: float  # AUROC of frac_above as a score for "specific" (NaN if one class is empty)
    rows: list[FkrRow]


def validate(
    acts: np.ndarray,
    phi: np.ndarray,
    features: np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    auroc_threshold: float = 0.85,
    ms_threshold: float = 36.0,
    min_fraction: float | None = 0.005,
    top_fraction: float | None = None,
) -> Validation:
    """All the measures on held-out ``acts`` ``[N, H]``, their ``phi`` ``[N, H]`` and ``features`` ``[N, F]``."""
    acts = _as_2d("acts", acts)
    phi = _as_2d("phi", phi, acts.shape[0])
    if phi.shape != acts.shape:
        raise ValueError(f"phi: expected the shape of acts {acts.shape}, got {phi.shape}")
    auroc = feature_specificity(acts, features)
    above = fraction_above(phi, ms_threshold)
    marked = flagged(above, min_fraction=min_fraction, top_fraction=top_fraction)
    specific = specific_neurons(auroc, auroc_threshold)
    single = specific_neurons(auroc, auroc_threshold, single=True)
    rank_auroc = float(feature_specificity(above[:, None], specific[:, None])[0, 0])
    best = best_matching_feature(phi, features)
    return Validation(
        frac_above=above,
        auroc=auroc,
        best=best,
        flagged=marked,
        specific=precision_recall(marked, specific),
        single=precision_recall(marked, single),
        rank_auroc=rank_auroc,
        rows=fkr_table(phi, features, best, fractions),
    )


# ------------------------------------------------------------------------------------------------
# the benchmark


class PlantedMLP(nn.Module):
    """``input_dim -> hidden -> ReLU -> num_features``; Inhibitors go after ``act``."""

    def __init__(self, input_dim: int, hidden: int, num_features: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(input_dim, hidden)
        self.act = nn.ReLU()
        self.fc_out = nn.Linear(hidden, num_features)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc_in(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


@dataclass
class MetricResult:
    """One trained model (one mode) and its validation."""

    mode: str
    steps: int
    hidden: int
    seed: int
    train_seconds: float
    train_loss: float  # mean BCE over the last tenth of the steps
    heldout_loss: float
    heldout_samples: int
    dead: int  # neurons constant on the held-out inputs
    validation: Validation
    config: dict[str, float] = field(default_factory=dict)


def _data_config(seed: int, batch_size: int, split: str, data: dict, **extra: object) -> dict:
    return {
        "kind": "sparse_features",
        "seed": seed,
        "feature_seed": seed,  # each seed its own task
        "batch_size": batch_size,
        "split": split,
        **data,
        **extra,
    }


def bench_metric(
    steps: int = 400,
    hidden: int = 128,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    modes: Sequence[str] = ("original", "rd"),
    auroc_threshold: float = 0.85,
    min_fraction: float = 0.005,
    ms_threshold: float = 36.0,
    heldout_samples: int = 4096,
    batch_size: int = 64,
    lr: float = 1e-2,
    data: dict | None = None,
) -> list[MetricResult]:
    """Train one :class:`PlantedMLP` per mode (same seed, same batches) on ``sparse_features`` and
    validate MS on ``heldout_samples`` held-out inputs (see the module doc)."""
    from memel.data import build

    if steps < 1 or hidden < 1 or heldout_samples < 2:
        raise ConfigError(
            f"need steps >= 1, hidden >= 1 and heldout_samples >= 2; got {steps}, {hidden} and {heldout_samples}"
        )
    for fraction in fractions:
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"fractions: got {fraction!r}; every inhibition fraction must be in (0, 1)")
    data = {"num_features": 16, "input_dim": 64, "active_prob": 0.1, "noise_std": 0.05, **(data or {})}
    results = []
    for mode in modes:
        config = memel.InhibitionConfig(mode=mode, ms_threshold=ms_threshold)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = PlantedMLP(data["input_dim"], hidden, data["num_features"])
        inhibitor = memel.inhibit(model, ["act"], config)["act"]
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        loader = build(_data_config(seed, batch_size, "train", data), rank=0, world_size=1)
        losses = []
        start = time.perf_counter()
        model.train()
        for _ in range(steps):
            batch = next(loader)
            loss = F.binary_cross_entropy_with_logits(model(batch.inputs), batch.features.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        train_seconds = time.perf_counter() - start
        model.eval()
        heldout = build(
            _data_config(
                seed,
                batch_size,
                "heldout",
                data,
                samples_per_epoch=heldout_samples,
                epochs=1,
                shuffle=False,
                drop_last=False,
            ),
            rank=0,
            world_size=1,
        )
        acts, features, heldout_loss = [], [], 0.0
        with torch.no_grad():
            for batch in heldout:
                h = model.hidden(batch.inputs)
                heldout_loss += F.binary_cross_entropy_with_logits(
                    model.fc_out(h), batch.features.float(), reduction="sum"
                ).item()
                acts.append(h)
                features.append(batch.features)
        h_all = torch.cat(acts)
        phi = inhibitor.monosemantic_scale(h_all).numpy()
        acts_np, features_np = h_all.double().numpy(), torch.cat(features).numpy()
        validation = validate(acts_np, phi, features_np, fractions, auroc_threshold, ms_threshold, min_fraction)
        tail = losses[-max(1, steps // 10) :]
        results.append(
            MetricResult(
                mode=mode,
                steps=steps,
                hidden=hidden,
                seed=seed,
                train_seconds=train_seconds,
                train_loss=float(np.mean(tail)),
                heldout_loss=heldout_loss / features_np.size,
                heldout_samples=acts_np.shape[0],
                dead=int((acts_np.std(0) == 0).sum()),
                validation=validation,
                config={"auroc_threshold": auroc_threshold, "min_fraction": min_fraction, "ms_threshold": ms_threshold},
            )
        )
    return results
