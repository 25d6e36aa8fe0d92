"""``redact`` hides URI credentials everywhere; the workers' secrets travel in a private file only."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from memel.redaction import redact, redact_tree, split_userinfo
from memel.training.worker_env import SECRETS_FILE_ENV, load_worker_env, split_env, worker_env


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://user:pw@host:5000", "http://user:***@host:5000"),
        ("https://alice:s3cr%40t@mlflow.example.org/path?x=1", "https://alice:***@mlflow.example.org/path?x=1"),
        ("https://ghp_TOKEN123@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
        ("postgresql+psycopg2://optuna:p@ss@db:5432/optuna", "postgresql+psycopg2://optuna:***@db:5432/optuna"),
        ("http://[::1]:80", "http://[::1]:80"),
        ("http://u:p@[::1]:80/x", "http://u:***@[::1]:80/x"),
        ("https://h/x?token=abc&page=2", "https://h/x?token=***&page=2"),
        ("https://b.s3/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=ff00&v=1", "https://b.s3/k?X-Amz-Credential=***&X-Amz-Signature=***&v=1"),
        ("https://h/x?api_key=k1;password=p1", "https://h/x?api_key=***;password=***"),
        (
            "🏃 View run smoke at: http://memel:pw@127.0.0.1:5000/#/experiments/1/runs/abc\nnext line",
            "🏃 View run smoke at: http://memel:***@127.0.0.1:5000/#/experiments/1/runs/abc\nnext line",
        ),
        ("error: cannot reach http://a:b@h1 or ftp://c:d@h2/f", "error: cannot reach http://a:***@h1 or ftp://c:***@h2/f"),
    ],
)
def test_redact_hides_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "http://127.0.0.1:5000", "https://mlflow.example.org/api?page=2&order=desc", "sqlite:////tmp/run/mlflow.db",
        "s3://bucket/prefix/key@v1", "/local/path/with@sign", "file:///tmp/mlruns", "alice@example.org",
        "a=1 and b=2", "", "http://host/?token=", "journal:///runs/optuna.log",
    ],
)  # fmt: skip
def test_redact_leaves_uris_without_credentials_unchanged(text: str) -> None:
    assert redact(text) == text


def test_redact_tree_reaches_nested_values_and_leaves_others() -> None:
    tree = {"tracking": {"uri": "http://u:pw@h", "tags": {"a": "b"}}, "list": ["x", "s3://k:s@b"], "n": 3, "f": None}
    assert redact_tree(tree) == {
        "tracking": {"uri": "http://u:***@h", "tags": {"a": "b"}}, "list": ["x", "s3://k:***@b"], "n": 3, "f": None,
    }  # fmt: skip
    assert tree["tracking"]["uri"] == "http://u:pw@h", "the input is not changed"


def test_split_userinfo_decodes_and_strips() -> None:
    assert split_userinfo("http://us%40er:p%3Aw@host:1/p?q=1") == ("http://host:1/p?q=1", "us@er", "p:w")
    assert split_userinfo("http://host:1") == ("http://host:1", None, None)
    assert split_userinfo("https://TOKEN@host") == ("https://host", "TOKEN", None)


def test_split_env_keeps_secrets_out_of_the_plain_variables() -> None:
    environ = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK", "AWS_SESSION_TOKEN": "ST", "MLFLOW_TRACKING_TOKEN": "MT",
        "MLFLOW_TRACKING_USERNAME": "envuser", "MLFLOW_TRACKING_URI": "http://x:y@h", "UNRELATED": "z",
    }  # fmt: skip
    plain, secret, bare = split_env(environ, "http://memel:pw@127.0.0.1:5000")
    assert plain == {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_REGION": "us-east-1"}
    assert secret == {
        "AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK", "AWS_SESSION_TOKEN": "ST", "MLFLOW_TRACKING_TOKEN": "MT",
        "MLFLOW_TRACKING_URI": "http://x:y@h", "MLFLOW_TRACKING_USERNAME": "memel", "MLFLOW_TRACKING_PASSWORD": "pw",
    }  # fmt: skip
    assert bare == "http://127.0.0.1:5000"


def test_worker_env_hands_secrets_over_in_a_private_file_then_deletes_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    environ = {"AWS_SECRET_ACCESS_KEY": "SK", "AWS_REGION": "eu-west-1"}
    with worker_env("http://u:pw@h:1", environ) as (env_vars, uri):
        assert uri == "http://h:1"
        assert set(env_vars) == {"AWS_REGION", SECRETS_FILE_ENV} and "SK" not in json.dumps(env_vars)
        path = Path(env_vars[SECRETS_FILE_ENV])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        monkeypatch.setenv(SECRETS_FILE_ENV, str(path))
        for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.delenv(name, raising=False)
        load_worker_env()  # what each worker does first
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == "SK"
        assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("u", "pw")
    assert not path.exists() and not path.parent.exists()
    load_worker_env()  # a node without the file keeps its own environment (no error)


def test_worker_env_without_secrets_writes_no_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with worker_env("sqlite:////tmp/x/mlflow.db", {"AWS_REGION": "eu-west-1"}) as (env_vars, uri):
        assert env_vars == {"AWS_REGION": "eu-west-1"} and uri == "sqlite:////tmp/x/mlflow.db"
    assert not list(tmp_path.iterdir())
