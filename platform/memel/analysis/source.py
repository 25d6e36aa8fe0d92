"""Resolve an analysis TARGET to its runs, its Parquet statistics and where results go.

TARGET is one of:

- a sweep's output folder (``runs/<job>/``, with ``sweep.json``, ``members/`` and ``stats/``);
- a Parquet statistics root, local or ``s3://`` (``<root>/run_id=<id>/module=<name>/*.parquet``);
  a local root inside a sweep folder brings that sweep's members along;
- an MLflow parent run id (tag ``memel.kind=sweep``): its child runs are the members. The
  tracking URI is ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the local store of a
  sweep folder under ``runs/`` whose ``sweep.json`` names that run.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from memel import run_record
from memel.atomic import read_state
from memel.errors import ConfigError


@dataclass
class Member:
    """One training run of the sweep, with what offline analysis needs from it."""

    run_id: str
    rung: str
    n_params: int
    mode: str
    strength: float
    top_n: int
    seed: int
    key: str = ""
    #: the sweep variant's name (``memel.variant``: a mode, or a name such as ``memel`` for ``{mode: rd, name: memel}``).
    variant: str = ""
    spec: dict[str, Any] | None = None
    checkpoint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.key or f"{self.rung}-{self.mode}-s{self.seed}"

    @property
    def layout(self) -> str | None:
        """The run's Inhibitor layout (``channel``/``element``), from its spec."""
        return ((self.spec or {}).get("inhibition") or {}).get("layout")

    @property
    def preset(self) -> str | None:
        """Where the run inserted inhibition: its model preset, or ``custom`` for explicit targets."""
        model = (self.spec or {}).get("model") or {}
        return "custom" if model.get("targets") else model.get("preset") if self.spec else None

    @property
    def ms_threshold(self) -> float | None:
        inhibition = (self.spec or {}).get("inhibition") or {}
        value = inhibition.get("ms_threshold")
        return float(value) if value is not None else None


@dataclass
class Source:
    """A resolved TARGET: the statistics dataset, the members and the sweep's parent run."""

    target: str
    kind: str  # "sweep_dir", "parquet" or "mlflow"
    stats_root: str
    members: list[Member]
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    sweep_dir: Path | None = None

    def dataset(self) -> ds.Dataset:
        """The statistics as a (lazy) pyarrow dataset, partition keys typed as strings."""
        return open_stats(self.stats_root)

    def stats(self) -> ds.Dataset | str:
        """What the aggregations scan: a local root as its folder (DuckDB reads it directly), else the dataset."""
        if self.stats_root.startswith("s3://"):
            return self.dataset()
        return str(Path(self.stats_root).expanduser().resolve())

    def member(self, run_id: str) -> Member | None:
        return next((m for m in self.members if m.run_id == run_id), None)

    def default_out(self) -> Path:
        if self.sweep_dir is not None:
            return self.sweep_dir / "analysis"
        name = self.parent_run_id[:8] if self.parent_run_id else Path(self.stats_root.rstrip("/")).name
        return Path(f"analysis-{name}")


def open_stats(root: str, field_name: str = "TARGET") -> ds.Dataset:
    """The hive-partitioned statistics dataset at ``root`` (local or ``s3://``)."""
    from memel.stats.schema import PARTITIONING
    from memel.stats.stats_root import resolve_root

    resolved = resolve_root(root, field_name)
    try:
        dataset = ds.dataset(
            resolved.base,
            format="parquet",
            filesystem=resolved.fs,
            partitioning=ds.partitioning(PARTITIONING, flavor="hive"),
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"{field_name}: cannot read Parquet statistics at {root!r}: {error}") from None
    if not dataset.files:
        raise ConfigError(
            f"{field_name}: {root!r} holds no Parquet files (expected run_id=<id>/module=<name>/*.parquet)"
        )
    return dataset


def read_spec(tree: dict[str, Any]) -> Any:
    """``TrainSpec(**tree)``, tolerating inhibition fields this version does not know."""
    from memel.inhibition import InhibitionConfig
    from memel.training import TrainSpec

    try:
        return TrainSpec(**tree)
    except ConfigError:
        inhibition = tree.get("inhibition")
        if not isinstance(inhibition, dict):
            raise
        known = {k: v for k, v in inhibition.items() if k in InhibitionConfig.accepted_keys}
        return TrainSpec(**{**tree, "inhibition": known})


def member_from_spec(
    run_id: str, spec_tree: dict[str, Any], key: str = "", summary: dict[str, Any] | None = None
) -> Member:
    """A member described by its TrainSpec JSON (and its TrainResult summary, if any)."""
    from memel.models import count_parameters

    model = spec_tree.get("model") or {}
    inhibition = spec_tree.get("inhibition") or {}
    name = model.get("name", "?")
    try:
        n_params = count_parameters(name, **(model.get("overrides") or {}))
    except ConfigError:
        n_params = 0
    summary = summary or {}
    tags = (spec_tree.get("tracking") or {}).get("tags") or {}
    metrics = {k: float(v) for k, v in (summary.get("metrics") or {}).items() if isinstance(v, (int, float))}
    return Member(
        run_id=run_id,
        rung=name,
        n_params=n_params,
        mode=inhibition.get("mode", "none"),
        strength=float(inhibition.get("strength", 0.0)),
        top_n=int(inhibition.get("top_n", 0)),
        seed=int((spec_tree.get("train") or {}).get("seed", 0)),
        key=key,
        variant=tags.get(run_record.TAG_VARIANT) or inhibition.get("mode", "none"),
        spec=spec_tree,
        checkpoint=summary.get("checkpoint"),
        metrics=metrics,
    )


def _sweep_dir_members(folder: Path) -> list[Member]:
    members = []
    for member_dir in sorted((folder / run_record.MEMBERS_DIR).glob("*")):
        run_file, spec_file = member_dir / run_record.RUN_FILE, member_dir / run_record.SPEC_FILE
        if not (run_file.is_file() and spec_file.is_file()):
            continue
        run = read_state(run_file)
        summary_file = member_dir / run_record.SUMMARY_FILE
        summary = read_state(summary_file) if summary_file.is_file() else None
        if not isinstance(run.get("run_id"), str):
            raise ConfigError(
                f"{run_file}: holds no run_id; restore it, or remove the member folder {member_dir} from the analysis"
            )
        members.append(member_from_spec(run["run_id"], read_state(spec_file), member_dir.name, summary))
    return members


def _from_sweep_dir(target: str, folder: Path, stats_root: str | None = None) -> Source:
    state = read_state(folder / run_record.SWEEP_FILE)
    stats = stats_root or str(folder / "stats")
    if not Path(stats).is_dir():
        raise ConfigError(
            f"TARGET: the sweep folder {folder} has no statistics folder {stats} (was stats.enabled false?)"
        )
    return Source(
        target=target,
        kind="sweep_dir",
        stats_root=stats,
        members=_sweep_dir_members(folder),
        parent_run_id=state.get("parent_run_id"),
        tracking_uri=_own_tracking_uri(folder, state.get("tracking_uri")),
        sweep_dir=folder,
    )


def _own_tracking_uri(folder: Path, recorded: str | None) -> str | None:
    """The sweep's tracking store, as recorded, unless it is a local SQLite store of another
    folder (the sweep folder was copied or moved): then the copy's own ``mlflow.db``, or none,
    so that analysing a copy never writes into the original's store."""
    if not recorded or not recorded.startswith("sqlite:///"):
        return recorded
    database = Path(recorded.removeprefix("sqlite:///"))
    if database.parent.resolve() == folder.resolve():
        return recorded
    own = folder / "mlflow.db"
    return f"sqlite:///{own.resolve()}" if own.is_file() else None


def _members_from_data(dataset: ds.Dataset) -> list[Member]:
    """Members described only by the statistics themselves (one streaming pass over a few columns)."""
    from .monosemantic_ratio import connect

    con = connect()
    con.register("stats", dataset)
    rows = con.execute(
        "SELECT run_id, any_value(model), any_value(n_params), any_value(mode), any_value(strength), "
        "any_value(top_n), any_value(seed) FROM stats GROUP BY run_id ORDER BY run_id"
    ).fetchall()
    return [Member(r[0], r[1], int(r[2]), r[3], float(r[4]), int(r[5]), int(r[6]), variant=r[3]) for r in rows]


def _mlflow_client(tracking_uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _artifact_json(client: Any, run_id: str, name: str) -> dict[str, Any] | None:
    try:
        with tempfile.TemporaryDirectory(prefix="memel-analyze-") as directory:
            path = client.download_artifacts(run_id, name, directory)
            return json.loads(Path(path).read_text())
    except Exception:  # noqa: BLE001 - a missing artifact only means less to analyse
        return None


def _find_local_sweep(run_id: str, search: Path) -> Path | None:
    for candidate in [search, *sorted(search.glob("*")), *sorted((search / "runs").glob("*"))]:
        state = candidate / run_record.SWEEP_FILE
        if state.is_file():
            try:
                if json.loads(state.read_text()).get("parent_run_id") == run_id:
                    return candidate
            except (OSError, ValueError):
                continue
    return None


def _from_mlflow(run_id: str, tracking_uri: str | None, search: Path) -> Source:
    local = _find_local_sweep(run_id, search)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and local is not None:
        uri = read_state(local / run_record.SWEEP_FILE).get("tracking_uri")
    if uri is None:
        raise ConfigError(
            f"TARGET: {run_id!r} is not a local folder; as an MLflow run id it needs a tracking store: "
            "pass --tracking-uri (or set MLFLOW_TRACKING_URI), or give the sweep's output folder instead"
        )
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(uri)
    try:
        parent = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(
            f"TARGET: no MLflow run {run_id!r} at {uri}; give a sweep's parent run id, its output folder or a Parquet root"
        ) from None
    tags = parent.data.tags
    if tags.get(run_record.TAG_KIND) == run_record.KIND_SWEEP_MEMBER and tags.get("mlflow.parentRunId"):
        raise ConfigError(f"TARGET: run {run_id!r} is a sweep member; analyse its sweep: {tags['mlflow.parentRunId']}")
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=10000
    )
    if not children:
        raise ConfigError(f"TARGET: MLflow run {run_id!r} at {uri} has no child runs; is it a sweep's parent run?")
    members, stats_root = [], None
    local_members = {m.run_id: m for m in _sweep_dir_members(local)} if local is not None else {}
    for child in children:
        cid = child.info.run_id
        if cid in local_members:
            member = local_members[cid]
        else:
            summary = _artifact_json(client, cid, run_record.SUMMARY_FILE) or {}
            spec_tree = _artifact_json(client, cid, run_record.SPEC_FILE) or {}
            ctags = child.data.tags
            member = member_from_spec(cid, spec_tree, ctags.get(run_record.TAG_MEMBER, ""), summary)
            if not spec_tree:  # fall back on the tags every member carries
                member = Member(
                    cid,
                    ctags.get(run_record.TAG_RUNG, "?"),
                    int(ctags.get(run_record.TAG_N_PARAMS) or 0),
                    ctags.get(run_record.TAG_MODE, "?"),
                    float(ctags.get(run_record.TAG_STRENGTH) or 0),
                    int(ctags.get(run_record.TAG_TOP_N) or 0),
                    int(ctags.get(run_record.TAG_SEED) or 0),
                    key=ctags.get(run_record.TAG_MEMBER, ""),
                    variant=ctags.get(run_record.TAG_VARIANT) or ctags.get(run_record.TAG_MODE, "?"),
                    checkpoint=summary.get("checkpoint"),
                )
            stats_root = stats_root or summary.get("stats_root")
        if not member.metrics:
            member.metrics = {k: float(v) for k, v in child.data.metrics.items()}
        members.append(member)
    if local is not None:
        stats_root = stats_root or str(local / "stats")
    if stats_root is None:
        raise ConfigError(
            f"TARGET: the members of run {run_id!r} name no statistics root (no summary.json artifact with stats_root)"
        )
    members.sort(key=lambda m: (m.n_params, m.mode, m.strength, m.top_n, m.seed))
    return Source(
        target=run_id,
        kind="mlflow",
        stats_root=stats_root,
        members=members,
        parent_run_id=run_id,
        tracking_uri=uri,
        sweep_dir=local,
    )


def _looks_like_parquet_root(folder: Path) -> bool:
    return any(folder.glob("run_id=*")) or any(folder.glob("**/*.parquet"))


def resolve(target: str, tracking_uri: str | None = None, search: Path | None = None) -> Source:
    """The :class:`Source` that ``target`` names; ConfigError naming TARGET when it names nothing usable."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(
            "TARGET: empty; give a sweep output folder, a Parquet statistics root or an MLflow parent run id"
        )
    target = target.strip()
    if target.startswith("s3://"):
        dataset = open_stats(target)
        return Source(
            target=target,
            kind="parquet",
            stats_root=target,
            members=_members_from_data(dataset),
            tracking_uri=tracking_uri,
        )
    path = Path(target).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"TARGET: {target!r} is a file; give a sweep output folder or a Parquet statistics root folder"
            )
        folder = Path(os.path.abspath(path))  # keeps a symlinked stats folder inside its sweep
        if (folder / run_record.SWEEP_FILE).is_file():
            return _from_sweep_dir(target, folder)
        if _looks_like_parquet_root(folder):
            if (folder.parent / run_record.SWEEP_FILE).is_file():
                return _from_sweep_dir(target, folder.parent, str(folder))
            dataset = open_stats(str(folder))
            return Source(target=target, kind="parquet", stats_root=str(folder), members=_members_from_data(dataset))
        raise ConfigError(
            f"TARGET: {target!r} is neither a sweep output folder (with sweep.json) nor a Parquet statistics root "
            "(run_id=<id>/module=<name>/*.parquet)"
        )
    if "/" in target or target.startswith((".", "~")):
        raise ConfigError(f"TARGET: no such folder {target!r}")
    return _from_mlflow(target, tracking_uri, search or Path.cwd())
