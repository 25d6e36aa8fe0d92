"""Plug-in insertion of Inhibitors after named submodules of an existing model."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from memel.errors import ConfigError

from .collectives import distributed_world, reduce_windows
from .config import InhibitionConfig
from .module import Inhibitor, Snapshot
from .sync import InhibitorGroup, PendingReduction, sync_inhibitors

#: Name of the child that holds an inserted Inhibitor inside its target module.
CHILD_NAME = "inhibitor"
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def match_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Names of the submodules matched by fnmatch-style patterns (``*`` spans dots), in
    model order; raises ConfigError naming every pattern that matches nothing."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ConfigError("targets: no pattern given; pass module-name patterns such as 'layers.*.mlp.act'")
    names = [name for name, module in model.named_modules() if name and not _inside_inhibitor(name, module)]
    matched = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if missing:
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise ConfigError(
            f"targets: pattern(s) {missing} match no submodule of {type(model).__name__}; its submodules are: {shown}"
        )
    return matched


def _inside_inhibitor(name: str, module: nn.Module) -> bool:
    return isinstance(module, Inhibitor) or name.split(".")[-1] == CHILD_NAME


def _hook(module: nn.Module, args: Any, output: Any) -> Any:
    inhibitor = module._modules[CHILD_NAME]
    if isinstance(output, torch.Tensor):
        return inhibitor(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return type(output)([inhibitor(output[0]), *output[1:]])
    raise TypeError(
        f"an Inhibitor follows {type(module).__name__}, whose output is {type(output).__name__}; "
        "it needs a tensor (or a tuple whose first element is one): target another module"
    )


def inhibit(
    model: nn.Module,
    targets: str | Iterable[str],
    config: InhibitionConfig | None = None,
    process_group: Any = None,
) -> dict[str, Inhibitor]:
    """Insert an Inhibitor after every submodule matching ``targets``; returns them by target name.

    The host's parameters and state-dict keys are untouched: each Inhibitor becomes a child
    ``<target>.inhibitor`` whose buffers are its only state, applied by a forward hook on
    the target. ``memel.remove(model)`` takes them out again.

    ``process_group``: the data-parallel group the modules' statistics and snapshots are
    reduced over (None: the default group); each module holds it (``Inhibitor.process_group``),
    so ``memel.sync``, ``memel.snapshot`` and ``Inhibitor.snapshot`` use it without being told.
    """
    config = config or InhibitionConfig()
    names = match_targets(model, targets)
    modules = dict(model.named_modules())
    for name in names:
        target = modules[name]
        if CHILD_NAME in target._modules:
            raise ConfigError(f"targets: {name!r} already has an Inhibitor; call memel.remove(model) first")
        if isinstance(target, _CONTAINERS):
            raise ConfigError(
                f"targets: {name!r} is a {type(target).__name__}, which runs all its children; "
                f"target its last submodule instead (e.g. '{name}.{len(target) - 1}')"
            )
    inserted: dict[str, Inhibitor] = {}
    for name in names:
        target = modules[name]
        inhibitor = Inhibitor(config)
        inhibitor.process_group = process_group
        target.add_module(CHILD_NAME, inhibitor)
        inhibitor._hook_handle = target.register_forward_hook(_hook)
        inserted[name] = inhibitor
    InhibitorGroup(list(inserted.values()))
    return inserted


def inhibitors(model: nn.Module) -> dict[str, Inhibitor]:
    """Every Inhibitor in ``model`` by the name of the module it follows (or its own name)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Inhibitor):
            found[name.removesuffix("." + CHILD_NAME) if name.endswith("." + CHILD_NAME) else name] = module
    return found


def remove(model: nn.Module) -> list[str]:
    """Take every inserted Inhibitor out of ``model``; returns the target names."""
    removed = []
    for name, module in list(model.named_modules()):
        child = module._modules.get(CHILD_NAME)
        if isinstance(child, Inhibitor) and getattr(child, "_hook_handle", None) is not None:
            child._hook_handle.remove()
            child._hook_handle = None
            del module._modules[CHILD_NAME]
            removed.append(name)
    return removed


def sync(model: nn.Module, process_group: Any = None, async_op: bool = False) -> PendingReduction | None:
    """Apply pending statistics of every Inhibitor in ``model`` as one batch.

    Distributed: one coalesced ``all_reduce`` per optimizer step gives every rank the global
    batch's statistics. Call it on every rank once per optimizer step (after
    ``optimizer.step()``); with ``async_op=True`` the reduction overlaps compute and lands
    before the next forward.

    Each module reduces over its own ``process_group`` (the one given to ``memel.inhibit``);
    ``process_group``, when given, overrides it for this call.
    """
    return sync_inhibitors(inhibitors(model).values(), process_group, async_op)


def snapshot(model: nn.Module, reset: bool = True, process_group: Any = None) -> dict[str, Snapshot]:
    """Snapshots of every initialised Inhibitor; in a distributed run every rank must call it
    (after ``sync``): the trackers of all modules are reduced across the ranks of their
    ``process_group`` (as ``sync``: the module's own unless ``process_group`` overrides it)
    with two collectives per group. A module with sharded statistics already holds every rank's
    trackers: its shards are gathered (two collectives of its own) and ``process_group`` must
    be None."""
    every = {name: m for name, m in inhibitors(model).items() if m.initialized}
    sharded = [name for name, m in every.items() if m.sharded]
    if sharded and process_group is not None:
        raise ValueError(
            f"process_group: the statistics of {sharded[0]!r} are sharded over its own process group "
            "(execution.shard_statistics); snapshot them without process_group"
        )
    found = {name: m for name, m in every.items() if not m.sharded}
    windows: dict[str, torch.Tensor] = {}
    for name, module in found.items():
        module.settle()
        windows[name] = module.window.clone()
    groups: list[tuple[Any, list[torch.Tensor]]] = []
    for name, module in found.items():
        group = process_group if process_group is not None else module.process_group
        grouped = next((windows_of for known, windows_of in groups if known is group), None)
        if grouped is None:
            grouped = []
            groups.append((group, grouped))
        grouped.append(windows[name])
    for group, grouped in groups:
        if distributed_world(group) is not None:
            reduce_windows(grouped, group)
    snapshots = {name: module.snapshot_from(windows[name], reset) for name, module in found.items()}
    snapshots.update({name: every[name].snapshot(reset) for name in sharded})
    return {name: snapshots[name] for name in every}


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """The inhibition loss of mode ``l2e`` (arXiv 2503.23298) to add to the training loss.

    Sum over every Inhibitor in ``model`` of l2e_weight * mean, over the values it selected
    since the last call (training forwards after the late start), of log((z - mu)^2 + delta),
    with autograd to those values (mu, the neuron's history mean, is a constant). Minimising
    it pulls the selected values towards their means, lowering their Monosemantic Scale.
    What it returns is forgotten, so calling it once per forward (or per micro-batch), before
    ``backward()``, counts every term once: ``loss = task_loss + memel.auxiliary_loss(model)``.
    A 0-dim zero tensor when nothing is pending: other modes, eval mode, before the late
    start, nothing selected, or no Inhibitor. Switching a module to eval mode forgets its
    unconsumed terms. In a data-parallel run each rank's loss covers its own values.
    """
    total: torch.Tensor | None = None
    device = None
    for module in inhibitors(model).values():
        if device is None:
            device = module.mean.device
        loss = module.auxiliary_loss()
        if loss is not None:
            total = loss if total is None else total + loss.to(total.device)
    if total is None:
        return torch.zeros((), device=device)
    return total
