"""Shared pytest fixtures."""

import pytest
from mlflow_server import mlflow_server  # noqa: F401  (session fixture: a real MLflow server on 127.0.0.1)
from s3_server import s3_server  # noqa: F401  (session fixture: a real S3 server on 127.0.0.1)


@pytest.fixture(scope="module")
def native_kernel() -> None:
    """Builds the native inhibition kernel (about 30-60 s the first time, then cached); skips,
    with the build error, only where it genuinely cannot be built."""
    import warnings

    from memel.inhibition import native

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if native.load() is None:
            pytest.skip(f"the native inhibition kernel cannot be built here: {native._failed}")
