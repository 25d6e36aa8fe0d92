"""The text loader against a real S3-protocol server (SeaweedFS) on 127.0.0.1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from s3_server import s3_env

from memel import data
from memel.data import DataError


@pytest.fixture(scope="module")
def bucket(s3_server):
    client = s3_server.client()
    client.create_bucket(Bucket="memel-corpus")
    rng = np.random.default_rng(1)
    texts = {f"shards/part{i}.txt": bytes(rng.integers(32, 127, 2000, dtype=np.uint8)) for i in range(4)}
    texts["shards/docs.jsonl"] = "\n".join(json.dumps({"text": f"line {i} " * 20}) for i in range(5)).encode()
    for key, body in texts.items():
        client.put_object(Bucket="memel-corpus", Key=key, Body=body)
    return texts


def test_s3_text_loader_matches_local(s3_server, bucket, tmp_path):
    for key, body in bucket.items():
        (tmp_path / key.split("/")[1]).write_bytes(body)
    config = dict(kind="text_lm", seq_len=32, batch_size=4, heldout_fraction=0.2)
    local = data.build({**config, "paths": [str(tmp_path)]})
    with s3_env(s3_server):
        remote = data.build({**config, "paths": ["s3://memel-corpus/shards"]}, rank=1, world_size=2)
        local = data.build({**config, "paths": [str(tmp_path)]}, rank=1, world_size=2)
        assert remote.num_examples() == local.num_examples()
        for _ in range(3):
            a, b = next(remote), next(local)
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
        state = remote.state_dict()
        expected = next(remote)
        again = data.build({**config, "paths": ["s3://memel-corpus/shards"]}, rank=1, world_size=2)
        again.load_state_dict(state)
        assert torch.equal(next(again).inputs, expected.inputs)


def test_s3_missing_bucket(s3_server):
    with (
        s3_env(s3_server),
        pytest.raises(DataError, match=r"paths: got 's3://no-such-bucket/x'.*bucket 'no-such-bucket' does not exist"),
    ):
        data.build(dict(kind="text_lm", paths=["s3://no-such-bucket/x"]))


def test_s3_missing_prefix(s3_server, bucket):
    with s3_env(s3_server), pytest.raises(DataError, match=r"paths: got 's3://memel-corpus/nothing'"):
        data.build(dict(kind="text_lm", paths=["s3://memel-corpus/nothing"]))
