"""Training-run specs: defaults, YAML + dotted overrides, and every bad input named early."""

from __future__ import annotations

from pathlib import Path

import pytest

from memel.errors import ConfigError
from memel.training import TrainSpec, load_spec
from memel.training.deepspeed_config import deepspeed_config

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"


def test_smoke_spec_loads_and_overrides_apply() -> None:
    spec = load_spec(SMOKE, ["train.steps=7", "inhibition.strength=2.5", "train.zero_stage=3"])
    assert spec.train.steps == 7 and spec.inhibition.strength == 2.5 and spec.train.zero_stage == 3
    assert spec.train.accumulation == 2  # 16 = 2 workers x 4 micro x 2
    config = deepspeed_config(spec)
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 2
    assert (
        spec.run_name == load_spec(SMOKE, ["train.steps=7", "inhibition.strength=2.5", "train.zero_stage=3"]).run_name
    )
    assert spec.run_name != load_spec(SMOKE).run_name
    assert (
        spec.run_name
        == load_spec(
            SMOKE, ["train.steps=7", "inhibition.strength=2.5", "train.zero_stage=3", "stats.every=3"]
        ).run_name
    )


def test_deepspeed_keeps_no_timer_that_waits_for_the_device_every_micro_batch() -> None:
    from deepspeed.utils.config import get_timers_config

    config = deepspeed_config(load_spec(SMOKE))
    assert config["wall_clock_breakdown"] is False
    assert get_timers_config(config).enabled is False, "DeepSpeed's throughput timer synchronizes the device"


def test_sharded_statistics_leave_the_fingerprints_of_specs_without_them_alone() -> None:
    """``inhibition.shard_statistics`` defaults off and is fingerprinted only when on: a spec
    without it (or with it off, flat or nested) keeps the run name it had before the key existed."""
    plain = load_spec(SMOKE)
    assert "shard_statistics" not in plain.model_dump(mode="json")["inhibition"]  # what the fingerprint hashes
    for off in ("inhibition.shard_statistics=false", "inhibition.execution.shard_statistics=false"):
        assert load_spec(SMOKE, [off]).run_name == plain.run_name
    on = load_spec(SMOKE, ["inhibition.shard_statistics=true"])
    assert on.inhibition.shard_statistics and on.run_name != plain.run_name
    assert load_spec(SMOKE, ["inhibition.execution.shard_statistics=true"]).run_name == on.run_name


def test_user_deepspeed_keys_win() -> None:
    spec = TrainSpec(train={"deepspeed": {"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5}})
    config = deepspeed_config(spec)
    assert config["zero_optimization"] == {"stage": 2, "reduce_scatter": False, "overlap_comm": True}
    assert config["gradient_clipping"] == 0.5
    mine = TrainSpec(train={"deepspeed": {"zero_optimization": {"reduce_scatter": True}}})
    assert deepspeed_config(mine)["zero_optimization"]["reduce_scatter"] is True


def test_zero2_on_cpu_all_reduces_whole_buckets_and_on_gpu_keeps_deepspeeds_default() -> None:
    assert deepspeed_config(load_spec(SMOKE))["zero_optimization"] == {"stage": 2, "reduce_scatter": False}
    assert "reduce_scatter" not in deepspeed_config(load_spec(SMOKE, ["train.zero_stage=1"]))["zero_optimization"]
    gpu = load_spec(SMOKE, ["train.use_gpu=true", "train.precision=bf16"])
    assert deepspeed_config(gpu)["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.zero_stage=4"], r"train\.zero_stage: .*0, 1, 2 or 3"),
        (["train.global_batch_size=10"], r"global_batch_size=10 does not divide .* use a multiple of 8"),
        (["train.precision=bf16"], r"precision='bf16' needs use_gpu"),
        (["train.stepz=3"], r"train\.stepz: unknown field"),
        (["inhibition.top_n=0"], r"inhibition.*top_n"),
        (["inhibition.mode=reverse"], r"inhibition.*mode.*'rd', 'naive_a', 'naive_b', 'original' or 'l2e'"),
        (["model.preset=nope"], r"model: preset: unknown preset 'nope'; allowed for this model: mlp"),
        (["model.name=pythia-3b"], r"model: model: unknown name 'pythia-3b'"),
        (["data.kind=video"], r"data"),
        (["data.seq_len=0"], r"seq_len"),
        (["name=bad name"], r"name"),
        (["train"], r"expected dotted.key=value"),
        (["train.steps.x=1"], r"'steps' is not a section"),
        (["train.placement=spread"], r"train\.placement: .*'PACK', 'SPREAD', 'STRICT_PACK' or 'STRICT_SPREAD'"),
    ],
)
def test_bad_specs_fail_with_the_field(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_spec(SMOKE, overrides)


def test_placement_keeps_the_run_name() -> None:
    """Where the workers run is not what they compute: a run resumes under any placement."""
    packed, spread = load_spec(SMOKE), load_spec(SMOKE, ["train.placement=STRICT_SPREAD"])
    assert packed.train.placement == "PACK" and spread.train.placement == "STRICT_SPREAD"
    assert spread.run_name == packed.run_name
    assert load_spec(SMOKE, ["train.seed=1"]).run_name != packed.run_name


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_spec(scalar)


def test_cluster_runs_take_tracking_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from memel.training import check_address_outputs

    spec = load_spec(SMOKE, ["stats.root=s3://bucket/stats"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    check_address_outputs(spec, None)  # embedded default: local outputs are fine
    with pytest.raises(ConfigError, match=r"tracking.uri: None is local to this machine.*MLFLOW_TRACKING_URI"):
        check_address_outputs(spec, "ray://head:10001")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    check_address_outputs(spec, "ray://head:10001")
    with pytest.raises(ConfigError, match=r"stats.root: None is local"):
        check_address_outputs(load_spec(SMOKE), "ray://head:10001")
    check_address_outputs(load_spec(SMOKE, ["stats.enabled=false"]), "ray://head:10001")
