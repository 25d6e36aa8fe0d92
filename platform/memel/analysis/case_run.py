"""The case study (Table 4) on a sweep's members: the shared-weights run on one trained member and,
where the sweep has them, each mode continuing from its own trained member."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from memel.errors import ConfigError

from .case_study import MODES, SELECTIONS, case_study, member_batches, member_loss, member_subject
from .source import Member, Source

#: The paper's learning rate of the one step (Swin-B on ImageNet).
PAPER_LR = 2e-6


@dataclass
class CaseResult:
    per_batch: pd.DataFrame
    member: Member
    step: int
    own: list[str]
    notes: list[str]


def choose_case_member(source: Source, wanted: str | None) -> Member:
    """``wanted`` (run id or member key), else the largest rung's ``original`` member with the lowest seed."""
    usable = [m for m in source.members if m.checkpoint and m.spec]
    if wanted:
        found = [m for m in source.members if wanted in (m.run_id, m.label)]
        if not found:
            raise ConfigError(
                f"--case-member: no member {wanted!r}; members: {', '.join(m.label for m in source.members)}"
            )
        if not (found[0].checkpoint and found[0].spec):
            raise ConfigError(f"--case-member: {wanted!r} has no local checkpoint and spec")
        return found[0]
    if not usable:
        raise ConfigError("no member has a local checkpoint and spec")
    original = [m for m in usable if m.mode == "original"] or usable
    return min(original, key=lambda m: (-m.n_params, m.seed, m.run_id))


def own_members(source: Source, member: Member) -> dict[str, Member]:
    """Per mode, the member trained under it with ``member``'s rung, seed and selection (one each)."""
    found: dict[str, Member] = {}
    for m in source.members:
        same = (m.rung, m.seed, m.top_n, m.layout, m.preset) == (
            member.rung,
            member.seed,
            member.top_n,
            member.layout,
            member.preset,
        )
        if (
            same
            and m.mode in MODES
            and m.checkpoint
            and m.spec
            and m.mode not in found
            and not (m.variant and m.variant != m.mode)
        ):
            found[m.mode] = m
    return found


def learning_rates(values: tuple[str, ...]) -> dict[str, float | None]:
    """``run`` (the member's last lr) or a number per entry, by display name."""
    rates: dict[str, float | None] = {}
    for value in values:
        rates[value] = None if value == "run" else float(value)
    return rates


def run_case(
    source: Source,
    wanted: str | None,
    batches: int,
    lrs: tuple[str, ...],
    random_control: bool,
    own: bool,
    optimizer: str = "run",
    batch_size: int | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> CaseResult:
    """The shared-weights case study on the chosen member (every mode, top-MS and random selection, every lr)
    and, with ``own``, each mode's step from its own trained member (top-MS selection)."""
    from .case_study import OptimizerState
    from .checkpoint import load_member, member_optimizer

    member = choose_case_member(source, wanted)
    trained = load_member(member)
    state = member_optimizer(trained) if optimizer == "run" else OptimizerState(lr=trained.spec.train.lr, kind="sgd")
    fixed = member_batches(trained, batches, batch_size)
    loss = member_loss(trained.kind)
    rates = learning_rates(lrs)
    selections = SELECTIONS if random_control else ("top_ms",)
    say(
        f"case study: {member.label} (step {trained.step}), {batches} batches x {len(MODES)} modes x {len(selections)} selections x {len(rates)} lr"
    )
    frames = [
        case_study(member_subject(trained, state, member.label), fixed, loss, MODES, selections, rates).assign(
            variant="shared"
        )
    ]
    notes: list[str] = []
    used: list[str] = []
    if own:
        members = own_members(source, member)
        if len(members) >= 2:
            for mode, other in members.items():
                say(f"case study: {mode} from its own member {other.label}")
                mine = load_member(other)
                state = (
                    member_optimizer(mine) if optimizer == "run" else OptimizerState(lr=mine.spec.train.lr, kind="sgd")
                )
                subject = member_subject(mine, state, other.label)
                frames.append(
                    case_study(subject, fixed, member_loss(mine.kind), (mode,), ("top_ms",), rates).assign(
                        variant="own"
                    )
                )
                used.append(other.label)
        else:
            notes.append(
                "case study: the sweep has no members of the other modes with this rung and seed; no own-checkpoint variant"
            )
    return CaseResult(pd.concat(frames, ignore_index=True), member, trained.step, used, notes)
