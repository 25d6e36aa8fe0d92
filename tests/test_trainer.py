"""The training loop and its callbacks, on CPU with a plain torch engine (the Ray/DeepSpeed
runs in test_training_ray.py use the same loop): hook order, stop requests across ranks,
metric reduction across ranks, checkpoints, the Optuna pruning callback, and import direction."""

from __future__ import annotations

import ast
import json
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import counting_all_reduce, run_distributed
from torch import nn

import memel
from memel.training.callbacks import Callback
from memel.training.engine import TorchEngine
from memel.training.metrics import reduce_metrics
from memel.training.trainer import Schedule, Trainer

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "memel"


@dataclass
class Batch:
    inputs: torch.Tensor
    targets: torch.Tensor


def _batches(seed: int = 0) -> Iterator[Batch]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = torch.randn(8, 4, generator=generator)
        yield Batch(inputs, (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long())


class Recorder(Callback):
    """Writes every hook call, with its callback's name, into a shared list."""

    def __init__(self, name: str, calls: list[tuple[str, str, int]], stop_at: int | None = None) -> None:
        self.name, self.calls, self.stop_at = name, calls, stop_at
        self.metrics: dict[int, dict[str, float]] = {}

    def post_step(self, step: int) -> None:
        self.calls.append((self.name, "post_step", step))

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.calls.append((self.name, "on_log", step))
        self.metrics[step] = dict(metrics)

    def on_eval(self, step: int, metrics: Mapping[str, float]) -> bool:
        self.calls.append((self.name, "on_eval", step))
        return self.stop_at is not None and step >= self.stop_at

    def on_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.calls.append((self.name, "on_metrics", step))

    def on_snapshot(self, step: int, snapshots: Mapping[str, Any], tokens_seen: int) -> None:
        self.calls.append((self.name, "on_snapshot", step))

    def on_checkpoint(self, step: int, directory: Path, metrics: Mapping[str, Any]) -> None:
        self.calls.append((self.name, "on_checkpoint", step))
        assert (directory / "saved.json").is_file() and metrics["step"] == step

    def close(self, failed: bool = False) -> None:
        self.calls.append((self.name, "close failed" if failed else "close", -1))


class Evaluation:
    """The held-out loss of a fixed batch, as the loop's evaluator."""

    def __init__(self) -> None:
        self.batch = next(_batches(seed=99))

    def periodic(self, engine: Any) -> dict[str, float]:
        with torch.no_grad():
            return {"eval/loss": float(nn.functional.cross_entropy(engine(self.batch.inputs), self.batch.targets))}

    def final(self, engine: Any, prefix: str) -> dict[str, float]:
        return {f"{prefix}loss": self.periodic(engine)["eval/loss"]}


class FileCheckpointer:
    def save(self, directory: Path, step: int, tokens_seen: int) -> None:
        (directory / "saved.json").write_text(json.dumps({"step": step, "tokens_seen": tokens_seen}))


def _trainer(schedule: Schedule, callbacks: list[Callback], seed: int = 0) -> tuple[Trainer, dict[str, Any]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    inserted = memel.inhibit(model, "1", memel.InhibitionConfig(mode="rd", stats_update="step", late_start=1))
    engine = TorchEngine(model, torch.optim.AdamW(model.parameters(), lr=0.05))
    trainer = Trainer(
        engine,
        _batches(seed),
        "classify",
        schedule,
        callbacks=callbacks,
        evaluator=Evaluation(),
        checkpointer=FileCheckpointer(),
        inserted=inserted,
    )
    return trainer, inserted


def test_hooks_run_in_order_for_every_callback_and_the_loop_trains() -> None:
    calls: list[tuple[str, str, int]] = []
    first, second = Recorder("a", calls), Recorder("b", calls)
    schedule = Schedule(
        steps=4,
        log_every=2,
        eval_every=2,
        stats_every=4,
        checkpoint_every=4,
        evaluate_initial=True,
        evaluate_final=True,
    )
    trainer, _ = _trainer(schedule, [first, second])
    state = trainer.fit()

    assert (state.step, state.tokens_seen, state.stopped) == (4, 32, False)
    hooks_at_4 = ["post_step", "on_log", "on_eval", "on_metrics", "on_snapshot", "on_metrics", "on_checkpoint"]
    expected = [("on_metrics", 0)]  # the initial evaluation
    expected += [("post_step", 1), ("post_step", 2), ("on_log", 2), ("on_eval", 2), ("post_step", 3)]
    expected += [(hook, 4) for hook in hooks_at_4] + [("close", -1)]
    assert calls == [(name, hook, step) for hook, step in expected for name in ("a", "b")]
    assert first.metrics[4]["train/loss"] < first.metrics[2]["train/loss"], "the loss must fall"
    assert {"eval/loss", "heldout/loss", "init/loss", "ms/mean", "stats/rank_divergence", "train/lr"} <= set(
        state.report()
    )
    assert state.report()["step"] == 4


def test_a_stop_request_from_on_eval_ends_the_run_after_that_step_and_every_callback_closes() -> None:
    calls: list[tuple[str, str, int]] = []
    stopper, other = Recorder("stop", calls, stop_at=4), Recorder("other", calls)
    trainer, _ = _trainer(Schedule(steps=10, log_every=1, eval_every=2, checkpoint_every=4), [stopper, other])
    state = trainer.fit()
    assert (state.step, state.stopped) == (4, True)
    assert ("other", "on_eval", 4) in calls, "every callback sees the evaluation, even after a stop request"
    assert ("other", "on_checkpoint", 4) in calls, "a checkpoint due at the stopping step is still taken"
    assert calls[-2:] == [("stop", "close", -1), ("other", "close", -1)]


def test_callbacks_close_when_the_loop_fails() -> None:
    calls: list[tuple[str, str, int]] = []

    class Failing(Callback):
        def post_step(self, step: int) -> None:
            raise RuntimeError("boom")

    trainer, _ = _trainer(Schedule(steps=3), [Failing(), Recorder("a", calls)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert calls == [("a", "close failed", -1)]  # told so: outputs give up on a broken store sooner


def test_torch_engine_accumulates_micro_batches_like_one_large_batch() -> None:
    batches = _batches(3)
    small = [next(batches) for _ in range(2)]
    large = Batch(torch.cat([b.inputs for b in small]), torch.cat([b.targets for b in small]))
    weights = []
    for accumulation, feed in ((2, small), (1, [large])):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation=accumulation)
        for batch in feed:
            engine.backward(nn.functional.cross_entropy(engine(batch.inputs), batch.targets))
            engine.step()
        weights.append(model.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


class HostReads:
    """Counts reads of tensor values into Python (``item``, ``float``, ``int``, ``bool``,
    ``tolist``) by the step the loop is in: reads during step ``k`` count under ``k - 1``
    (``post_step(k)`` ends it), reads after ``post_step(k)`` (logging etc.) under ``k``."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.step, self.reads = 0, []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                self.reads.append(self.step)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


class StepMarker(Callback):
    def __init__(self, reads: HostReads) -> None:
        self.reads = reads

    def post_step(self, step: int) -> None:
        self.reads.step = step


def _plain_trainer(schedule: Schedule, callbacks: list[Callback]) -> Trainer:
    """A model without Inhibitors (whose kernels read their own values), on the classify kind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1), accumulation=schedule.accumulation)
    return Trainer(engine, _batches(0), "classify", schedule, callbacks=callbacks)


def test_the_loop_reads_no_tensor_into_python_between_log_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU each read waits for the device: only log steps may read (the window's loss)."""
    logged = Recorder("a", [])
    reads = HostReads(monkeypatch)
    _plain_trainer(Schedule(steps=8, accumulation=2, log_every=4), [StepMarker(reads), logged]).fit()
    monkeypatch.undo()
    assert set(reads.reads) == {4, 8}, f"reads at steps {sorted(set(reads.reads))}"
    assert sorted(logged.metrics) == [4, 8]


def test_the_logged_training_loss_is_the_item_weighted_mean_of_the_micro_batch_losses() -> None:
    """Checked against the same training run by hand, each loss added as a Python float."""
    logged = Recorder("a", [])
    _plain_trainer(Schedule(steps=6, accumulation=2, log_every=3), [logged]).fit()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches, expected = _batches(0), {}
    loss_sum = items = 0.0
    for step in range(1, 7):
        for _ in range(2):
            batch = next(batches)
            loss = nn.functional.cross_entropy(model(batch.inputs), batch.targets)
            (loss / 2).backward()
            loss_sum, items = loss_sum + float(loss.detach()) * len(batch.targets), items + len(batch.targets)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 3 == 0:
            expected[step], loss_sum, items = loss_sum / items, 0.0, 0.0
    assert {step: m["train/loss"] for step, m in logged.metrics.items()} == expected


def test_evaluation_accuracy_counts_the_right_predictions_of_every_batch() -> None:
    from memel.training.evaluation import evaluate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.1))
    metrics = evaluate(engine, _batches(5), 3, "classify", torch.device("cpu"))
    batches = [next(b) for b in [_batches(5)] for _ in range(3)]
    with torch.no_grad():
        right = sum(int((model(b.inputs).argmax(-1) == b.targets).sum()) for b in batches)
    assert metrics["eval/accuracy"] == right / sum(len(b.targets) for b in batches)
    assert 0 < right < 24


def test_the_step_timer_writes_each_step_s_time_since_the_previous_step_end(tmp_path: Path) -> None:
    from memel.training.callbacks import StepTimer
    from memel.training.callbacks.timing import step_times

    assert step_times([(1, 10.0), (2, 10.5), (3, 12.0)]) == {"steps": [2, 3], "seconds": [0.5, 1.5]}
    timer = StepTimer(tmp_path / "steps.json")
    _plain_trainer(Schedule(steps=5), [timer]).fit()
    written = json.loads((tmp_path / "steps.json").read_text())
    assert written["steps"] == [2, 3, 4, 5]
    assert written["seconds"] == pytest.approx([b - a for (_, a), (_, b) in zip(timer.ends, timer.ends[1:])])
    assert all(seconds > 0 for seconds in written["seconds"])


def _reduce_worker(rank: int, world_size: int, out_dir: str) -> None:
    value = float(rank + 1)  # rank 0: 1, rank 1: 2
    with counting_all_reduce() as calls:
        reduced = reduce_metrics({"a_sum": (value, "sum"), "a_mean": (value * 2, "mean"), "a_max": (value * 3, "max")})
        sums_only = reduce_metrics({"s": (value, "sum"), "m": (value, "mean")})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"reduced": reduced, "sums_only": sums_only, **calls}))


def test_metrics_reduce_across_two_ranks_by_their_reduce_type(tmp_path: Path) -> None:
    run_distributed(_reduce_worker, 2, str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["reduced"] == {"a_sum": 3.0, "a_mean": 3.0, "a_max": 6.0}
        assert result["sums_only"] == {"s": 3.0, "m": 1.5}
        assert result["all_reduce"] == 3, "sums and means share one collective; max adds one only when present"


def _stop_worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    calls: list[tuple[str, str, int]] = []
    callbacks = [Recorder("pruner", calls, stop_at=4)] if rank == 0 else []  # as pruning: rank 0 only
    trainer, _ = _trainer(Schedule(steps=10, log_every=2, eval_every=2, stats_every=2), callbacks, seed=rank)
    state = trainer.fit()
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"step": state.step, "stopped": state.stopped, "metrics": state.metrics})
    )


def test_a_stop_request_on_rank_0_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    run_distributed(_stop_worker, 2, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [(r["step"], r["stopped"]) for r in results] == [(4, True), (4, True)]
    # the window's loss and the snapshots are reduced over both ranks (their models differ): the same numbers
    assert results[0]["metrics"]["eval/loss"] != results[1]["metrics"]["eval/loss"]
    for key in ("train/loss", "stats/rank_divergence", "ms/mean"):
        assert results[0]["metrics"][key] == results[1]["metrics"][key], key
    assert results[0]["metrics"]["stats/rank_divergence"] == 0.0


def _diverging_worker(rank: int, world_size: int, out_dir: str) -> None:
    from memel.errors import NonFiniteLossError

    torch.set_num_threads(1)
    calls: list[tuple[str, str, int]] = []
    trainer, _ = _trainer(Schedule(steps=10, log_every=2, eval_every=2), [Recorder("a", calls)], seed=rank)
    if rank == 1:  # only this rank's loss goes NaN, at step 3
        clean = trainer.loader
        trainer.loader = (Batch(b.inputs * float("nan"), b.targets) if i >= 2 else b for i, b in enumerate(clean))
    try:
        trainer.fit()
        raised = None
    except NonFiniteLossError as error:
        raised = {"step": error.step, "message": str(error), "again": str(pickle.loads(pickle.dumps(error)))}
    logged = [step for _, hook, step in calls if hook == "on_log"]
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"raised": raised, "logged": logged, "closed": calls[-1][1]})
    )


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    run_distributed(_diverging_worker, 2, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["raised"] is not None and result["raised"]["step"] == 4, result
        assert result["raised"]["message"].startswith("training loss became non-finite at step 4 (train/loss=nan")
        assert (
            "lower train.lr" in result["raised"]["message"] and result["raised"]["again"] == result["raised"]["message"]
        )
        assert result["logged"] == [2], "the non-finite window is not logged"
        assert result["closed"] == "close failed", "callbacks close (as failed) when the run diverges"


def test_the_pruning_config_pickles_and_the_callback_prunes_through_sqlite_storage(tmp_path: Path) -> None:
    import optuna

    from memel.training.callbacks import PruningCallback
    from memel.training.trial import TrialConfig, open_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url)
    other = optuna.create_study(study_name="other", storage=storage)  # trial ids differ from trial numbers
    for _ in range(3):
        other.tell(other.ask(), 0.0)
    study = optuna.create_study(study_name="s", storage=storage)
    for _ in range(2):  # the median pruner starts after two finished trials
        good = study.ask()
        for step, value in enumerate([2.0, 1.0], start=1):
            good.report(value, step)
        study.tell(good, 1.0)
    worse = study.ask()
    config = TrialConfig(url, "s", worse.number, "eval/loss", "median")
    assert pickle.loads(pickle.dumps(config)) == config

    callback = PruningCallback(pickle.loads(pickle.dumps(config)))
    assert callback.on_eval(1, {"eval/loss": 1.5}) is False
    assert callback.on_eval(2, {"eval/loss": 5.0}) is True
    assert callback.on_eval(3, {"eval/accuracy": 0.1}) is False, "a metric the trial does not track is not reported"
    reloaded = optuna.load_study(study_name="s", storage=url)
    assert reloaded.trials[worse.number].intermediate_values == {1: 1.5, 2: 5.0}
    assert all(not t.intermediate_values for t in optuna.load_study(study_name="other", storage=url).trials)


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports from the memel package (absolute names; relative ones resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("memel")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("memel"):
                found.add(name)
                found |= {f"{name}.{alias.name}" for alias in node.names}
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_training_imports_nothing_from_orchestration() -> None:
    graph = _module_graph()
    upward = {
        (name, target)
        for name, targets in graph.items()
        if name.startswith("memel.training")
        for target in targets
        if target.startswith("memel.orchestration")
    }
    assert not upward


def test_the_package_has_no_import_cycle_between_its_rooms() -> None:
    """No two rooms (top-level subpackages) import each other, directly or through others
    (imports of a package's own ``__init__`` from inside it are not edges)."""
    graph = _module_graph()
    rooms: dict[str, set[str]] = {}
    for name, targets in graph.items():
        room = ".".join(name.split(".")[:2])
        rooms.setdefault(room, set()).update(".".join(t.split(".")[:2]) for t in targets)
    for room, targets in rooms.items():
        targets.discard(room)
    for start, targets in rooms.items():
        seen, stack = set(), list(targets)
        while stack:
            room = stack.pop()
            assert room != start, f"import cycle through {start}"
            if room not in seen:
                seen.add(room)
                stack.extend(rooms.get(room, ()))


def test_run_info_brings_its_trial_back_typed_from_the_loop_config() -> None:
    """Ray Train's loop config carries ``asdict(RunInfo)``; the worker rebuilds the typed trial."""
    from dataclasses import asdict

    from memel.training.trial import TrialConfig
    from memel.training.worker import RunInfo

    info = RunInfo("run", "http://mlflow", None, 10, trial=TrialConfig("sqlite:///x.db", "s", 3, "eval/loss", "none"))
    assert RunInfo.from_dict(asdict(info)) == info
    assert RunInfo.from_dict(asdict(RunInfo("run", None, None, 1))).trial is None
