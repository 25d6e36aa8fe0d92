"""Create the Optuna tables if the storage is new, then run optuna-dashboard on it.

optuna-dashboard does not create the schema itself and fails on an empty database, while the
first ``memel tune`` may come later. The storage URL comes from ``OPTUNA_STORAGE``; a
PostgreSQL password comes from ``PGPASSWORD`` (read by libpq), never from the URL.
"""

import os

import optuna


def main() -> None:
    """Initialise the storage, then replace this process with the dashboard."""
    storage = os.environ["OPTUNA_STORAGE"]
    optuna.storages.RDBStorage(storage)
    port = os.environ.get("PORT", "8080")
    os.execvp("optuna-dashboard", ["optuna-dashboard", "--host", "0.0.0.0", "--port", port, storage])


if __name__ == "__main__":
    main()
