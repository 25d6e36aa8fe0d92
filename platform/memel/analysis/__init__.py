"""Offline emergence analysis of a sweep's per-neuron statistics and checkpoints (``memel analyze``).

- :mod:`.source`: TARGET (sweep folder, Parquet root, MLflow parent run id) -> members + dataset.
- :mod:`.monosemantic_ratio`: the fraction of neurons carrying a sparse feature per rung, mode, step and depth,
  calibrated against featureless neurons (:mod:`.monosemantic_null`)
  (one streaming DuckDB pass over the Parquet dataset).
- :mod:`.probing`, :mod:`.ablation`: the paper's Figure 2 (a sparse probe finds the best "code" neuron;
  its mean-ablation's % loss increase per token group, against random neurons).
- :mod:`.case_study`: the paper's Table 4 (one optimizer step per mode: Decrease and Update Ratios,
  Lemma 3.3's alignment, a random-selection control); :mod:`.case_run` runs it on a sweep's members.
- :mod:`.significance`: the paper's Table 9 (paired t-tests, original vs inhibited).
- :mod:`.plots`, :mod:`.report`, :mod:`.pipeline`: figures, the HTML report, the whole run.
"""

from .monosemantic_ratio import Criterion, RatioResult, analyze_ratio, module_steps, top_neurons
from .pipeline import Analysis, Options, analyze, log_to_mlflow, write
from .source import Member, Source, resolve

__all__ = [
    "Analysis",
    "Criterion",
    "Member",
    "Options",
    "RatioResult",
    "Source",
    "analyze",
    "analyze_ratio",
    "log_to_mlflow",
    "module_steps",
    "resolve",
    "top_neurons",
    "write",
]
