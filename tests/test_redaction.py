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
        (
            "https://b.s3/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=ff00&v=1",
            "https://b.s3/k?X-Amz-Credential=***&X-Amz-Signature=***&v=1",
        ),
        ("https://h/x?api_key=k1;password=p1", "https://h/x?api_key=***;password=***"),
        (
            "🏃 View run smoke at: http://memel:pw@127.0.0.1:5000/#/experiments/1/runs/abc\nnext line",
            "🏃 View run smoke at: http://memel:***@127.0.0.1:5000/#/experiments/1/runs/abc\nnext line",
        ),
        (
            "error: cannot reach http://a:b@h1 or ftp://c:d@h2/f",
            "error: cannot reach http://a:***@h1 or ftp://c:***@h2/f",
        ),
    ],
)
def test_redact_hides_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "http://127.0.0.1:5000",
        "https://mlflow.example.org/api?page=2&order=desc",
        "sqlite:////tmp/run/mlflow.db",
        "s3://bucket/prefix/key@v1",
        "/local/path/with@sign",
        "file:///tmp/mlruns",
        "alice@example.org",
        "a=1 and b=2",
        "",
        "http://host/?token=",
        "journal:///runs/optuna.log",
    ],
)
def test_redact_leaves_uris_without_credentials_unchanged(text: str) -> None:
    assert redact(text) == text


def test_redact_hides_known_secret_values(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "abc")  # too short to replace safely
    text = "denied: key env-secret-value, token tok-12345, word abc"
    assert redact(text, ["tok-12345"]) == "denied: key ***, token ***, word abc"


def test_redact_tree_reaches_nested_values_and_leaves_others() -> None:
    tree = {"tracking": {"uri": "http://u:pw@h", "tags": {"a": "b"}}, "list": ["x", "s3://k:s@b"], "n": 3, "f": None}
    assert redact_tree(tree) == {
        "tracking": {"uri": "http://u:***@h", "tags": {"a": "b"}},
        "list": ["x", "s3://k:***@b"],
        "n": 3,
        "f": None,
    }
    assert tree["tracking"]["uri"] == "http://u:pw@h", "the input is not changed"


def test_split_userinfo_decodes_and_strips() -> None:
    assert split_userinfo("http://us%40er:p%3Aw@host:1/p?q=1") == ("http://host:1/p?q=1", "us@er", "p:w")
    assert split_userinfo("http://host:1") == ("http://host:1", None, None)
    assert split_userinfo("https://TOKEN@host") == ("https://host", "TOKEN", None)


def test_split_env_keeps_secrets_out_of_the_plain_variables() -> None:
    environ = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:8333",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_SESSION_TOKEN": "ST",
        "MLFLOW_TRACKING_TOKEN": "MT",
        "MLFLOW_TRACKING_USERNAME": "envuser",
        "MLFLOW_TRACKING_URI": "http://x:y@h",
        "UNRELATED": "z",
    }
    plain, secret, bare = split_env(environ, "http://memel:pw@127.0.0.1:5000")
    assert plain == {"AWS_ENDPOINT_URL": "http://127.0.0.1:8333", "AWS_REGION": "us-east-1"}
    assert secret == {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_SESSION_TOKEN": "ST",
        "MLFLOW_TRACKING_TOKEN": "MT",
        "MLFLOW_TRACKING_URI": "http://x:y@h",
        "MLFLOW_TRACKING_USERNAME": "memel",
        "MLFLOW_TRACKING_PASSWORD": "pw",
    }
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
            monkeypatch.setenv(name, "")  # so that monkeypatch restores it after the test
            monkeypatch.delenv(name)
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


def test_submit_never_shows_credentials_of_the_address_or_the_overrides(monkeypatch) -> None:
    from typer.testing import CliRunner

    from memel.cli import app

    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent-home")  # no ~/.ray/auth_token
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-sentinel-4711")
    smoke = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
    args = [
        "submit",
        str(smoke),
        "--command",
        "train",
        "--address",
        "http://ops:addr-sentinel-4711@127.0.0.1:9",
        "--set",
        "tracking.uri=http://memel:uri-sentinel-4711@mlflow.example:5000",
        "--set",
        "stats.root=s3://bucket/prefix",
    ]
    runner = CliRunner(env={"COLUMNS": "300"})
    refused = runner.invoke(app, args)  # credentials in an override would travel in the entrypoint
    assert refused.exit_code == 2, refused.output
    assert "error: --set tracking.uri: holds credentials" in " ".join(refused.output.split()), refused.output
    args[args.index("tracking.uri=http://memel:uri-sentinel-4711@mlflow.example:5000")] = (
        "tracking.uri=http://mlflow.example:5000"
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # nothing listens on port 9
    assert "cannot reach the Ray dashboard at http://ops:***@127.0.0.1:9" in result.output
    assert "not sent: AWS_SECRET_ACCESS_KEY" in " ".join(result.output.split()), result.output
    for sentinel in ("addr-sentinel-4711", "uri-sentinel-4711", "aws-sentinel-4711"):
        assert sentinel not in refused.output + result.output


def _project(root: Path) -> Path:
    """A small project checkout: pyproject.toml and a committed job, plus untracked secrets."""
    import shutil
    import subprocess

    (root / "jobs" / "private").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'p'\n")
    shutil.copy(Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml", root / "jobs" / "smoke.yaml")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "pyproject.toml", "jobs/smoke.yaml"], check=True)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "-C", str(root), "commit", "-qm", "init"], check=True, env=env)
    for secret in (".env", "credentials.json", "jobs/private/id_rsa"):
        (root / secret).write_text("secret-sentinel-4711")
    (root / "data").mkdir()
    (root / "data" / "extra.txt").write_text("deliberate")
    (root / "jobs" / "new.yaml").write_text((root / "jobs" / "smoke.yaml").read_text())  # untracked, but the job
    return root


def _packaged(root: Path, excludes: list[str]) -> set[str]:
    """The files Ray itself packs into the working_dir upload, with these excludes."""
    import uuid
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    target = root.parent / f"package-{uuid.uuid4().hex}.zip"
    create_package(str(root), target, include_gitignore=False, excludes=excludes)
    with zipfile.ZipFile(target) as package:
        return {name for name in package.namelist() if not name.endswith("/")}


CLUSTER = ("tracking.uri=http://mlflow.example:5000", "stats.root=s3://bucket/prefix")


def test_submit_leaves_untracked_files_behind_unless_included(tmp_path: Path) -> None:
    from memel.submission import SubmitRequest, plan_job

    root = _project(tmp_path / "project")
    plan = plan_job(SubmitRequest(root / "jobs" / "new.yaml", "http://head:8265", "train", CLUSTER), {})
    assert plan.left_out == (".env", "credentials.json", "data/extra.txt", "jobs/private/id_rsa")
    assert plan.left_out_reason == "not tracked by git"
    shipped = _packaged(root, plan.runtime_env["excludes"])
    assert shipped == {"pyproject.toml", "jobs/smoke.yaml", "jobs/new.yaml"}, shipped

    chosen = plan_job(
        SubmitRequest(root / "jobs" / "new.yaml", "http://head:8265", "train", CLUSTER, includes=("data/",)), {}
    )
    assert chosen.left_out == (".env", "credentials.json", "jobs/private/id_rsa")
    assert "data/extra.txt" in _packaged(root, chosen.runtime_env["excludes"])


def test_submit_outside_git_leaves_the_deny_list_behind(tmp_path: Path) -> None:
    import shutil

    from memel.submission import SubmitRequest, plan_job

    root = _project(tmp_path / "project")
    shutil.rmtree(root / ".git")
    (root / ".aws").mkdir()
    (root / ".aws" / "config").write_text("secret-sentinel-4711")
    (root / "key.pem").write_text("secret-sentinel-4711")
    plan = plan_job(SubmitRequest(root / "jobs" / "smoke.yaml", "http://head:8265", "train", CLUSTER), {})
    assert plan.left_out == (".aws/config", ".env", "credentials.json", "jobs/private/id_rsa", "key.pem")
    assert plan.left_out_reason.startswith("on the deny-list")
    shipped = _packaged(root, plan.runtime_env["excludes"])
    assert shipped == {"pyproject.toml", "jobs/smoke.yaml", "jobs/new.yaml", "data/extra.txt"}, shipped
