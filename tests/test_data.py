"""Offline data loaders: sharding, determinism, resume, splits, labels, shapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from memel import data
from memel.data import DataError


def write_corpus(root: Path, files: int = 6, size: int = 3000) -> Path:
    """Text files whose bytes encode (file, position) so windows are identifiable."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        (root / f"doc{i}.txt").write_bytes(bytes(rng.integers(32, 127, size, dtype=np.uint8)))
    return root


def drain(loader, count: int | None = None) -> list:
    batches = []
    for batch in loader:
        batches.append(batch)
        if count is not None and len(batches) == count:
            break
    return batches


def rows(batches) -> list[tuple]:
    return [tuple(row.flatten().tolist()) for batch in batches for row in batch[0]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


# --- sharding, determinism, resume (shared by every loader) ------------------------------


@pytest.mark.parametrize("world_size", [2, 3])
def test_text_lm_shards_cover_epoch_without_overlap(corpus, world_size):
    base = dict(kind="text_lm", paths=[str(corpus)], seq_len=16, batch_size=1, heldout_fraction=0.0, epochs=1)
    full = rows(drain(data.build({**base, "even_shards": False}, 0, 1)))
    assert len(full) == len(set(full))  # random text: all windows distinct
    shards = [rows(drain(data.build({**base, "even_shards": False}, r, world_size))) for r in range(world_size)]
    union = [row for shard in shards for row in shard]
    assert sorted(union) == sorted(full)  # covers the epoch, no duplicate
    even = [set(rows(drain(data.build(base, r, world_size)))) for r in range(world_size)]
    assert len({len(s) for s in even}) == 1  # equal counts per rank
    assert all(not (a & b) for i, a in enumerate(even) for b in even[i + 1 :])
    assert len(set().union(*even)) >= len(full) - world_size + 1


@pytest.mark.parametrize(
    "config",
    [
        dict(kind="sparse_features", samples_per_epoch=60, batch_size=4),
        dict(kind="nowcast", samples_per_epoch=12, batch_size=2, size=16, input_frames=2, output_frames=2),
        dict(kind="digits", batch_size=16),
    ],
)
def test_generated_loaders_shard_without_overlap(config):
    def keys(loader):
        return {tuple(b[0][i].flatten().tolist()) for b in drain(loader) for i in range(len(b[0]))}

    config = {**config, "epochs": 1, "even_shards": False, "drop_last": False}
    full = keys(data.build(config))
    parts = [keys(data.build(config, r, 3)) for r in range(3)]
    assert set().union(*parts) == full
    assert sum(len(p) for p in parts) == len(full)


def test_deterministic_from_seed(corpus):
    config = dict(kind="text_lm", paths=[str(corpus)], seq_len=16, batch_size=4)
    a, b = drain(data.build(config), 5), drain(data.build(config), 5)
    c = drain(data.build({**config, "seed": 1}), 5)
    assert all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x.inputs, y.inputs) for x, y in zip(a, c, strict=True))
    batch = a[0]
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


@pytest.mark.parametrize(
    "config",
    [
        dict(kind="text_lm", seq_len=16, batch_size=8),  # the shakespeare default
        dict(kind="sparse_features", samples_per_epoch=40, batch_size=8),
        dict(kind="nowcast", samples_per_epoch=8, batch_size=2, size=16, input_frames=2, output_frames=1),
        dict(kind="text_classification", task="prose_vs_code", seq_len=32, batch_size=8),
        dict(kind="planted_text", seq_len=32, batch_size=8),
    ],
)
def test_resume_equals_uninterrupted(config):
    """Across an epoch boundary: save, rebuild, restore, continue == never stopped."""
    small = config["kind"] in ("sparse_features", "nowcast")
    total = 9 if small else 6
    stop = 7 if small else 3
    reference = drain(data.build(config, 1, 2), total)
    first = data.build(config, 1, 2)
    drain(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    resumed = data.build(config, 1, 2)
    resumed.load_state_dict(state)
    rest = drain(resumed, total - stop)
    for x, y in zip(reference[stop:], rest, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


def test_epochs_and_reshuffle():
    loader = data.build(dict(kind="sparse_features", samples_per_epoch=16, batch_size=4, epochs=2))
    batches = drain(loader)
    assert len(batches) == 8 and len(loader) == 4
    first = {tuple(r.tolist()) for b in batches[:4] for r in b.inputs}
    second = {tuple(r.tolist()) for b in batches[4:] for r in b.inputs}
    assert first == second
    assert not torch.equal(batches[0].inputs, batches[4].inputs)


def test_load_state_dict_rejects_other_setup():
    loader = data.build(dict(kind="sparse_features", samples_per_epoch=16, batch_size=4))
    state = loader.state_dict()
    other = data.build(dict(kind="sparse_features", samples_per_epoch=16, batch_size=4, seed=3))
    with pytest.raises(DataError, match="seed"):
        other.load_state_dict(state)


# --- text LM -------------------------------------------------------------------------------


def test_heldout_split_disjoint_by_file(corpus):
    base = dict(kind="text_lm", paths=[str(corpus)], seq_len=16, heldout_fraction=0.34, epochs=1, batch_size=1)
    train = data.build(base)
    held = data.build({**base, "split": "heldout"})
    train_docs = {d.name for d in train.stream.segments if hasattr(d, "name")}
    held_docs = {d.name for d in held.stream.segments if hasattr(d, "name")}
    assert train_docs and held_docs and not train_docs & held_docs
    assert len(train_docs | held_docs) == 6 and len(held_docs) == 2
    assert not set(rows(drain(train))) & set(rows(drain(held)))


def test_jsonl_and_parquet_by_document(tmp_path):
    texts = [f"document number {i} " * 5 for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts[:5])))
    pq.write_table(pa.table({"body": texts[5:]}), tmp_path / "b.parquet")
    base = dict(
        kind="text_lm",
        paths=[str(tmp_path)],
        text_field="body",
        seq_len=8,
        batch_size=2,
        split_by="document",
        heldout_fraction=0.2,
        separator="|",
    )
    train, held = data.build(base), data.build({**base, "split": "heldout"})
    train_text = b"".join(d.data for d in train.stream.segments if hasattr(d, "data"))
    held_text = b"".join(d.data for d in held.stream.segments if hasattr(d, "data"))
    assert len(held.stream.segments) == 3  # 2 documents + a separator
    for i, text in enumerate(texts):
        assert (text.encode() in train_text) != (text.encode() in held_text), i
    batch = next(train)
    assert batch.inputs.shape == (2, 8) and int(batch.inputs.max()) < 256


def test_offline_corpora_and_mixed_heldout():
    loader = data.build(dict(kind="text_lm", corpus="mixed", seq_len=32, batch_size=2, split="heldout"))
    labels = {d.label for d in loader.stream.segments if hasattr(d, "label")}
    assert labels <= {"shakespeare", "shakespeare-folio", "python-code"} and labels


# --- classification ------------------------------------------------------------------------


def test_folder_classification_labels(tmp_path):
    (tmp_path / "milton").mkdir()
    (tmp_path / "shakespeare").mkdir()
    (tmp_path / "milton" / "paradise.txt").write_bytes(b"M" * 400)
    (tmp_path / "milton" / "regained.txt").write_bytes(b"N" * 400)
    (tmp_path / "shakespeare" / "hamlet.txt").write_bytes(b"S" * 400)
    (tmp_path / "shakespeare" / "lear.txt").write_bytes(b"T" * 400)
    base = dict(
        kind="text_classification",
        task="folder",
        path=str(tmp_path),
        seq_len=20,
        batch_size=4,
        epochs=1,
        split_by="file",
        heldout_fraction=0.5,
        drop_last=False,
    )
    for split in ("train", "heldout"):
        loader = data.build({**base, "split": split})
        assert loader.class_names == ["milton", "shakespeare"]
        seen = set()
        for batch in loader:
            for x, y in zip(batch.inputs, batch.targets, strict=True):
                letter = chr(int(x[0]))
                assert torch.all(x == x[0])
                assert y.item() == (0 if letter in "MN" else 1)
                seen.add(letter)
        assert len(seen) == 2  # one file per class in each split
        assert loader.num_examples() == 40


def test_offline_classification_tasks():
    loader = data.build(dict(kind="text_classification", task="edition", seq_len=64, batch_size=16))
    batch = next(loader)
    assert batch.inputs.shape == (16, 64) and set(batch.targets.tolist()) <= {0, 1}
    labels = loader.labels
    assert (labels == 0).sum() == (labels == 1).sum()  # balanced
    held = data.build(dict(kind="text_classification", task="edition", seq_len=64, split="heldout"))
    train_docs = {loader.docs[i].name for i in np.unique(loader.doc_id)}
    held_docs = {held.docs[i].name for i in np.unique(held.doc_id)}
    assert not train_docs & held_docs
    work = data.build(dict(kind="text_classification", task="work", seq_len=64, split="heldout"))
    assert work.num_classes > 30 and len(np.unique(work.labels)) == work.num_classes


def test_glue_tsv(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\nit\'s "great" fun\t1\ndull\t0\nfine film\t1\n')
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nbad\t0\n")
    loader = data.build(dict(kind="glue", path=str(tmp_path), seq_len=8, batch_size=3, shuffle=False))
    batch = next(loader)
    assert bytes(batch.inputs[0].tolist()) == b"it's \"gr"
    assert bytes(batch.inputs[1].tolist()) == b"dull\0\0\0\0"
    assert batch.targets.tolist() == [1, 0, 1]
    dev = data.build(dict(kind="glue", path=str(tmp_path), seq_len=8, batch_size=1, split="heldout"))
    assert next(dev).targets.tolist() == [0]
    # CoLA: no header, label in column 1, sentence in column 3
    cola = tmp_path / "cola"
    cola.mkdir()
    (cola / "train.tsv").write_text("gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more books.\n")
    (cola / "dev.tsv").write_text("gj04\t1\t\tHe left.\n")
    loader = data.build(
        dict(
            kind="glue",
            path=str(cola),
            text_column=3,
            label_column=1,
            header=False,
            seq_len=12,
            batch_size=2,
            shuffle=False,
        )
    )
    batch = next(loader)
    assert bytes(batch.inputs[0].tolist()) == b"The sailors "
    assert batch.targets.tolist() == [1, 0]


# --- images --------------------------------------------------------------------------------


def test_digits():
    train = data.build(dict(kind="digits", batch_size=64))
    held = data.build(dict(kind="digits", batch_size=64, split="heldout"))
    batch = next(train)
    assert batch.inputs.shape == (64, 1, 8, 8) and batch.inputs.dtype == torch.float32
    assert 0.0 <= batch.inputs.min() and batch.inputs.max() <= 1.0
    assert train.num_examples() + held.num_examples() == 1797
    assert set(held.labels.tolist()) == set(range(10))
    train_rows = {tuple(x.flatten().tolist()) for x in train.images}
    assert sum(tuple(x.flatten().tolist()) in train_rows for x in held.images) < 20  # only genuine duplicates


def test_image_folder_npy(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            value = (i + 1) * (10 if cls == "cat" else 20)
            np.save(tmp_path / cls / f"{i}.npy", np.full((6, 7, 3), value, dtype=np.uint8))
    loader = data.build(dict(kind="image_folder", path=str(tmp_path), batch_size=4, heldout_fraction=0.2))
    held = data.build(
        dict(kind="image_folder", path=str(tmp_path), batch_size=2, split="heldout", heldout_fraction=0.2)
    )
    assert loader.class_names == ["cat", "dog"] and loader.num_examples() == 8 and held.num_examples() == 2
    assert not {str(f) for f in loader.files} & {str(f) for f in held.files}
    batch = next(loader)
    assert batch.inputs.shape == (4, 3, 6, 7)
    for x, y in zip(batch.inputs, batch.targets, strict=True):
        step = 10 if y == 0 else 20
        assert round(float(x[0, 0, 0]) * 255) % step == 0


def test_image_folder_png_without_pillow(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"\x89PNG\r\n")
    real = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(DataError, match="Pillow"):
        data.build(dict(kind="image_folder", path=str(tmp_path), heldout_fraction=0.0))


# --- nowcasting ----------------------------------------------------------------------------


def test_nowcast_determinism_range_and_motion():
    config = dict(kind="nowcast", batch_size=3, size=64, input_frames=4, output_frames=6, samples_per_epoch=6)
    a, b = next(data.build(config)), next(data.build(config))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert a.inputs.shape == (3, 4, 1, 64, 64) and a.targets.shape == (3, 6, 1, 64, 64)
    assert a.inputs.min() >= 0 and a.inputs.max() <= 1 and a.inputs.max() > 0.3
    assert torch.allclose(a.inputs * 255, (a.inputs * 255).round(), atol=1e-3)  # integer pixels
    assert not torch.equal(next(data.build({**config, "seed": 5})).inputs, a.inputs)
    # one fast cell: its rain-weighted centre moves with its velocity
    moving = data.build({**config, "min_cells": 1, "max_cells": 1, "min_speed": 2.0, "max_speed": 2.0})
    cells = moving.cells_of(0)
    rain = cells.rain(np.array([3.0, 5.0]), 64)
    grid = np.arange(64)
    centre = [((r.sum(0) * grid).sum() / r.sum(), (r.sum(1) * grid).sum() / r.sum()) for r in rain]
    shift = np.subtract(centre[1], centre[0])
    assert np.linalg.norm(shift) > 1.0
    assert np.allclose(shift, [2 * cells.vx[0], 2 * cells.vy[0]], atol=0.5)
    assert cells.rain(np.arange(10.0), 64).max(axis=(1, 2)).std() > 0  # grows / decays
    large = data.build({**config, "size": 120})
    assert next(large).inputs.shape[-2:] == (120, 120)


def test_rain_to_pixel_matches_hko7():
    rate = np.array([0.0, 0.5, 1.0, 10.0, 200.0, 1e4])
    dbz = 10 * np.log10(200 * np.maximum(rate, 1e-6) ** 1.6)
    expected = np.clip(np.round(255 * (dbz + 10) / 80), 0, 255)
    assert np.array_equal(data.rain_to_pixel(rate), expected)
    assert data.rain_to_pixel(np.array([0.0]))[0] == 0 and data.rain_to_pixel(np.array([1e4]))[0] == 255
    assert data.rain_to_pixel(np.array([1.0]))[0] == round(255 * (10 * np.log10(200) + 10) / 80)


# --- planted features ----------------------------------------------------------------------


def test_sparse_features_match_construction():
    loader = data.build(
        dict(
            kind="sparse_features",
            num_features=8,
            input_dim=32,
            active_prob=0.3,
            noise_std=0.0,
            samples_per_epoch=64,
            batch_size=16,
        )
    )
    batch = next(loader)
    assert batch.features.shape == (16, 8) and set(batch.features.unique().tolist()) <= {0, 1}
    assert torch.equal(batch.targets, batch.features.float())
    directions = torch.from_numpy(loader.directions)
    # with no noise the input lies in the span of exactly its active directions
    for x, f in zip(batch.inputs, batch.features, strict=True):
        active = directions[f.bool()]
        if len(active) == 0:
            assert torch.allclose(x, torch.zeros_like(x))
            continue
        coef = torch.linalg.lstsq(active.T, x[:, None]).solution
        assert torch.allclose(active.T @ coef, x[:, None], atol=1e-4)
        assert ((coef >= 0.5 - 1e-4) & (coef <= 1.5 + 1e-4)).all()
    rate = torch.cat([b.features for b in drain(loader, 4)]).float().mean()
    assert 0.15 < rate < 0.45


def test_planted_text_features_are_source_one_hot():
    loader = data.build(dict(kind="planted_text", seq_len=64, batch_size=32))
    batch = next(loader)
    assert loader.class_names == ["shakespeare", "shakespeare-folio", "python-code"]
    assert torch.equal(batch.features.argmax(1), batch.targets) and torch.equal(
        batch.features.sum(1), torch.ones(32, dtype=torch.long)
    )
    for x, y, index in zip(batch.inputs, batch.targets, loader.indices()[:32], strict=True):
        assert loader.docs[int(loader.doc_id[index])].label == loader.class_names[int(y)]
        assert torch.equal(x, torch.from_numpy(loader.passage(int(index))))


def test_sparse_features_of_every_seed_share_the_task_the_heldout_set_is_scored_on():
    """The feature directions come from ``feature_seed``, not the sampling seed: a linear decoder fit on
    a seed-7 run's training batches reads the features of the held-out set memel scores runs on
    (seed 0); with another task (``feature_seed``) it reads nothing."""
    base = dict(kind="sparse_features", num_features=8, input_dim=32, active_prob=0.3, samples_per_epoch=512)
    train = data.build(dict(base, seed=7, batch_size=512))
    heldout = data.build(dict(base, seed=0, split="heldout", shuffle=False, batch_size=512))
    other_task = data.build(dict(base, seed=0, split="heldout", shuffle=False, batch_size=512, feature_seed=3))
    assert np.array_equal(train.directions, heldout.directions)
    assert not np.array_equal(train.directions, other_task.directions)
    fit = next(train)
    decoder = torch.linalg.lstsq(fit.inputs, fit.targets).solution

    def accuracy(batch) -> float:
        return float(((batch.inputs @ decoder > 0.5) == batch.features.bool()).float().mean())

    same, other = next(heldout), next(other_task)
    assert not torch.equal(same.inputs, fit.inputs), "other samples"
    assert accuracy(same) > 0.95
    assert accuracy(other) < 0.85  # about the rate of always answering "off" (0.7)
