"""Jobs users submit: validated job specs, scale sweeps and Optuna studies over training runs."""

from .job import JobSpec, Member, SweepSection, TuneSection, expand_sweep, load_job

__all__ = ["JobSpec", "Member", "SweepSection", "TuneSection", "expand_sweep", "load_job"]
