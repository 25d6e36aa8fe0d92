"""``memel bench ...``: benchmarks that print side-by-side ratios."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from memel.commands.app import bench_app
from memel.errors import ConfigError


def _refuse(error: ConfigError) -> typer.Exit:
    Console().print(f"[red]error:[/red] {error}")
    return typer.Exit(2)


def _write_json(path: str | None, rows: list[object], **context: object) -> None:
    """The rows (dataclasses) and the run's context as one JSON document at ``path``."""
    if path is None:
        return
    import dataclasses
    import json
    from pathlib import Path

    Path(path).write_text(json.dumps({**context, "rows": [dataclasses.asdict(row) for row in rows]}, indent=1) + "\n")


def _device_label(device: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu, {torch.get_num_threads()} threads"


@bench_app.command("inhibition")
def bench_inhibition_command(
    batch: int = typer.Option(8, help="Leading dim of the float32 activation."),
    seq: int = typer.Option(512, help="Sequence dim."),
    hidden: int = typer.Option(4096, help="Hidden (neuron) dim."),
    top_n: list[int] = typer.Option([1, 10, 100], "--top-n", help="Values selected per sample (repeatable)."),
    repeats: int = typer.Option(7, help="Interleaved timing pairs per row; the median ratio is reported."),
    track_every: int = typer.Option(1, help="Snapshot tracking interval (InhibitionConfig.track_every)."),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)."),
    kernel: list[str] = typer.Option(
        [],
        "--kernel",
        help="Hot-path kernels to time (repeatable; default: native, compiled, eager on CPU; compiled, eager on CUDA).",
    ),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="InhibitionConfig.reuse_buffers of the module timed."),
    device: str = typer.Option("cpu", help="Where the activation lives: cpu, cuda or cuda:N."),
    json_path: str | None = typer.Option(None, "--json", help="Also write the rows as JSON to this file."),
) -> None:
    """Time the Inhibitor (rd mode) forward+backward against a plain h*1.0 on the same tensor.

    Also against a warm copy (one read and one write each way into reused buffers): h*1.0
    writes fresh tensors, whose page faults the module's reused buffers do not pay.

    Example: [bold]memel bench inhibition --top-n 1 --top-n 10[/bold]
    (on a GPU: [bold]memel bench inhibition --device cuda --kernel eager --kernel compiled[/bold])
    """
    import torch

    from memel.benchmarks.inhibition import bench_inhibition

    if threads:
        torch.set_num_threads(threads)
    kernels = kernel or (["native", "compiled", "eager"] if device == "cpu" else ["compiled", "eager"])
    try:
        rows = bench_inhibition(
            (batch, seq, hidden),
            top_ns=top_n,
            repeats=repeats,
            track_every=track_every,
            kernels=kernels,
            reuse_buffers=reuse,
            device=device,
        )
    except ConfigError as error:
        raise _refuse(error) from None
    title = f"Inhibitor fwd+bwd / (h*1.0) fwd+bwd, float32 [{batch}, {seq}, {hidden}], {_device_label(device)}"
    _write_json(json_path, rows, title=title, shape=[batch, seq, hidden], device=device)
    table = Table(title=title)
    for column in (
        "kernel",
        "layout",
        "top_n",
        "module ms",
        "h*1.0 ms",
        "median ratio",
        "best/best",
        "warm copy ms",
        "/ warm",
    ):
        table.add_column(column, justify="right")
    for row in rows:
        warm = ("-", "-") if row.warm_ms is None else (f"{row.warm_ms:.1f}", f"{row.warm_ratio:.2f}x")
        table.add_row(
            row.kernel,
            row.layout,
            str(row.top_n),
            f"{row.module_ms:.1f}",
            f"{row.baseline_ms:.1f}",
            f"{row.ratio:.2f}x",
            f"{row.best_ratio:.2f}x",
            *warm,
        )
    Console().print(table)


@bench_app.command("overhead")
def bench_overhead_command(
    model: str = typer.Option("byte-4m", help="Model from `memel models` (its CPU step should take about a second)."),
    preset: str = typer.Option("mlp", help="Where the Inhibitors go."),
    batch: int = typer.Option(16),
    seq: int = typer.Option(256),
    rounds: int = typer.Option(7, help="Timed steps per variant (interleaved)."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    variant: list[str] = typer.Option(
        [],
        "--variant",
        help="Variants to time (repeatable; default: all): none, original, rd, rd@threshold, l2e, "
        "l2e@threshold, rd/eager, rd+parquet.",
    ),
    device: str = typer.Option("cpu", help="Where the model trains: cpu, cuda or cuda:N."),
    json_path: str | None = typer.Option(None, "--json", help="Also write the rows as JSON to this file."),
) -> None:
    """Training-step time with inhibition (original, rd top-1, rd with threshold selection, l2e,
    rd with the eager kernel, rd while writing Parquet snapshots every step) against the same
    model without any module, interleaved in one run.

    Example: [bold]memel bench overhead --model byte-4m --rounds 9 --variant none --variant rd --variant l2e@threshold[/bold]
    (on a GPU: [bold]memel bench overhead --device cuda --model pythia-70m --batch 8 --seq 512 --rounds 20[/bold])
    """
    import torch

    from memel.benchmarks.overhead import bench_overhead

    torch.set_num_threads(threads)
    chosen = tuple(variant) if variant else None
    if chosen and "none" not in chosen:
        chosen = ("none", *chosen)  # ratios are to the model without any module
    try:
        rows = bench_overhead(
            model, preset, batch, seq, rounds, device=device, **({"variants": chosen} if chosen else {})
        )
    except ConfigError as error:
        raise _refuse(error) from None
    title = f"{model} ({preset}), batch {batch} x {seq}, {_device_label(device)}: step time vs no module"
    _write_json(json_path, rows, title=title, model=model, preset=preset, batch=batch, seq=seq, device=device)
    table = Table(title=title)
    for column in ("variant", "step ms", "ratio to none", "module share"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row.variant, f"{row.step_ms:.0f}", f"{row.ratio:.3f}x", f"{100 * row.module_share:.2f}%")
    Console().print(table)


@bench_app.command("ddp")
def bench_ddp_command(
    spec_path: str = typer.Argument("jobs/smoke.yaml", metavar="SPEC.yaml"),
    model: list[str] = typer.Option([], "--model", help="Model to run (repeatable; default: the spec's)."),
    zero: list[int] = typer.Option([], "--zero", help="ZeRO stage to run (repeatable; default: the spec's)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: dotted.key=value (repeatable)."),
    json_path: str | None = typer.Option(None, "--json", help="Also write the rows as JSON to this file."),
    ray_floor: bool = typer.Option(
        False, "--ray-floor", help="Also time the DeepSpeed loop beside an idle Ray instance (Ray's background alone)."
    ),
) -> None:
    """Step time of `memel train` (Ray Train + DeepSpeed, tracking and statistics on) against plain
    torchrun loops on the same model, data and workers (DDP; the bare DeepSpeed engine with the
    run's config), one row per model and ZeRO stage.

    Defaults: 60 steps, logged every 5; the median (and mean) step time over the same steps
    after the first fifth on every side; ratio = DDP step time / memel step time; DS ratio =
    DeepSpeed loop step time / memel step time (what memel and Ray cost beside their engine).
    --ray-floor: Ray floor = DeepSpeed loop step time / the same loop's beside an idle Ray
    instance with a Ray Train run's helper actors (the most of the engine's speed Ray Train keeps);
    ceiling = DDP step time / that loop's (the ratio if memel cost nothing).

    Example: [bold]memel bench ddp --model byte-1m --model byte-4m --zero 0 --zero 2[/bold]
    """
    from memel.benchmarks.ddp import bench_ddp
    from memel.training import load_spec

    base = ["train.steps=60", "train.log_every=5", "checkpoint.every=1000000", *set_]
    try:
        spec = load_spec(spec_path, base)
        specs = [
            load_spec(spec_path, [*base, f"model.name={name}", f"train.zero_stage={stage}"])
            for name in model or [spec.model.name]
            for stage in zero or [spec.train.zero_stage]
        ]
    except ConfigError as error:
        raise _refuse(error) from None
    title = f"memel train against torchrun DDP and DeepSpeed, {spec.train.workers} workers, {spec.train.steps} steps"
    rows, failed = [], []
    for one in specs:  # each row is shown and saved as soon as it is measured: a later failure loses nothing
        name = f"{one.model.name} ZeRO-{one.train.zero_stage}"
        try:
            row = bench_ddp(one, ray_floor=ray_floor)
        except Exception as error:  # one failed row (a crashed process) must not lose the others
            failed.append(name)
            print(f"{name}: not measured ({error})", flush=True)
            continue
        rows.append(row)
        print(
            f"{name}: memel {row.memel_median_ms:.1f} ms, DDP {row.ddp_median_ms:.1f} ms, "
            f"DeepSpeed {row.deepspeed_median_ms:.1f} ms a step; ratio {row.ratio:.3f}, DS ratio {row.deepspeed_ratio:.3f}"
            + ("" if row.ray_floor is None else f", Ray floor {row.ray_floor:.3f}, ceiling {row.ceiling:.3f}"),
            flush=True,
        )
        _write_json(json_path, rows, title=title, spec=spec_path, overrides=set_)
    table = Table(title=title)
    columns = ["model", "ZeRO", "steps", "memel ms", "DDP ms", "DeepSpeed ms", "ratio", "mean ratio", "DS ratio"]
    for column in columns + (["DS beside Ray ms", "Ray floor", "ceiling"] if ray_floor else []):
        table.add_column(column, justify="right")
    for row in rows:
        floor = [f"{row.beside_ray_median_ms:.1f}", f"{row.ray_floor:.3f}", f"{row.ceiling:.3f}"] if ray_floor else []
        table.add_row(
            row.model,
            str(row.zero_stage),
            str(row.steps),
            f"{row.memel_median_ms:.1f}",
            f"{row.ddp_median_ms:.1f}",
            f"{row.deepspeed_median_ms:.1f}",
            f"{row.ratio:.3f}",
            f"{row.mean_ratio:.3f}",
            f"{row.deepspeed_ratio:.3f}",
            *floor,
        )
    Console(width=max(Console().width, 150 if ray_floor else 110)).print(table)  # not folded into 80
    if failed:
        print(f"error: not measured: {', '.join(failed)} (see above); the rows measured are shown and saved")
        raise typer.Exit(1)
