"""Which folders a sweep claims: the sweep's own folder (its job name and base fingerprint) and one per
member (its run name). Light on imports, so that ``memel validate`` can check them without torch or Ray."""

from __future__ import annotations

from memel import run_record
from memel.training.output_dir import Claim, check_output_dir, run_claim

from .job import JobSpec, expand_sweep


def sweep_claim(job: JobSpec) -> Claim:
    """A sweep's claim on its folder: the job's name and its base run's fingerprint (members may
    be added, with more seeds or modes; a changed base would mix two specs in one sweep)."""
    return Claim(run_record.SWEEP_FILE, {"job": job.name, "fingerprint": job.base_fingerprint()})


def check_folders(job: JobSpec) -> None:
    """The sweep's folder and every member's hold nothing of another spec (ConfigError otherwise)."""
    check_output_dir(job.out.resolve(), claim=sweep_claim(job))
    for member in expand_sweep(job):
        check_output_dir(member.spec.out.resolve(), claim=run_claim(member.spec.run_name))
