"""Bad input to the data configs and loaders: clear errors naming field, value, allowed."""

from __future__ import annotations

import pytest

from memel import data
from memel.data import DataError


@pytest.mark.parametrize(
    ("config", "words"),
    [
        (dict(kind="text_lm", paths=["/no/such/corpus"]), ["paths", "/no/such/corpus", "s3://"]),
        (dict(kind="text_lm", corpus="klingon"), ["corpus", "klingon", "shakespeare", "stdlib-code", "mixed"]),
        (dict(kind="text_lm", seq_len=0), ["seq_len", "0", "greater than or equal to 1"]),
        (dict(kind="text_lm", seq_len=-3), ["seq_len", "-3"]),
        (dict(kind="text_lm", corpus="mixed", paths=["x"]), ["corpus", "paths"]),
        (dict(kind="text_lm", colour="red"), ["colour", "unknown field", "seq_len"]),
        (dict(kind="text_classification", task="astrology"), ["task", "astrology", "prose_vs_code", "edition"]),
        (dict(kind="text_classification", task="folder"), ["path", "folder"]),
        (dict(kind="text_classification", task="folder", path="/no/where"), ["path", "/no/where"]),
        (dict(kind="glue", path="/no/glue"), ["path", "/no/glue"]),
        (dict(kind="image_folder", path="/no/images"), ["path", "/no/images"]),
        (dict(kind="nowcast", min_cells=5, max_cells=2), ["max_cells", "min_cells"]),
        (dict(kind="digits", split="test"), ["split", "test", "train", "heldout"]),
        (dict(kind="mnist"), ["kind", "mnist", "text_lm", "digits"]),
        (dict(seq_len=3), ["kind", "None"]),
        (dict(kind="text_lm", heldout_fraction=1.5), ["heldout_fraction", "1.5"]),
    ],
)
def test_bad_config(config, words):
    with pytest.raises(DataError) as info:
        data.build(config)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        data.build(dict(kind="text_lm", paths=[str(tmp_path)], heldout_fraction=0.0))
    (tmp_path / "other.csv").write_text("a,b")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "x.csv").write_text("a")
    with pytest.raises(DataError, match=r"paths.*no files ending in \.txt"):
        data.build(dict(kind="text_lm", paths=[str(sub)]))


def test_corpus_shorter_than_a_window(tmp_path):
    (tmp_path / "a.txt").write_text("short")
    with pytest.raises(DataError, match=r"seq_len: got 64.*only 5 tokens"):
        data.build(dict(kind="text_lm", paths=[str(tmp_path)], seq_len=64, heldout_fraction=0.0))


def test_single_file_cannot_be_held_out(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    with pytest.raises(DataError, match=r"heldout_fraction: got 0.1.*only 1 file"):
        data.build(dict(kind="text_lm", paths=[str(tmp_path)], seq_len=4))


def test_bad_rank():
    with pytest.raises(DataError, match=r"rank: got 2.*\[0, world_size=2\)"):
        data.build(dict(kind="sparse_features"), rank=2, world_size=2)
    with pytest.raises(DataError, match="world_size: got 0"):
        data.build(dict(kind="sparse_features"), rank=0, world_size=0)


def test_glue_unknown_column(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match=r"text_column: got 'text'.*\['sentence', 'label'\]"):
        data.build(dict(kind="glue", path=str(tmp_path), text_column="text"))


def test_jsonl_missing_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "hello"}\n')
    with pytest.raises(DataError, match=r"text_field: got 'text'.*\['body'\]"):
        data.build(dict(kind="text_lm", paths=[str(tmp_path)], heldout_fraction=0.0))


def test_unknown_uri_scheme():
    with pytest.raises(DataError, match=r"paths: got 'gs://b/x'.*s3://"):
        data.build(dict(kind="text_lm", paths=["gs://b/x"]))
