"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes, each its own
raylet, object store, temp dir and TMPDIR, all on 127.0.0.1 (``ray.cluster_utils.Cluster``).
The head runs the dashboard with its Job Submission API on 127.0.0.1 (:attr:`LocalCluster.dashboard`),
for ``memel submit``.

Every process of the cluster listens on loopback only, so a driver must connect with Ray's
cluster mode off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, in :meth:`LocalCluster.driver_env`);
otherwise Ray turns ``127.0.0.1`` into the host's address. The cluster has its own token
(``RAY_AUTH_MODE=token``); this machine's ~/.ray/auth_token is not used. A node is taken away
whole with :meth:`LocalCluster.lose`: its raylet, object store, agents and workers are killed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memel.services.ports import free_ports

LOOPBACK = "127.0.0.1"
#: Node death is noticed after about 2 s (not Ray's default 30 s), so a lost node fails the run quickly.
FAST_HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 2}
OBJECT_STORE_BYTES = 100 * 1024 * 1024
DASHBOARD_START_TIMEOUT_S = 120


@dataclass
class LocalCluster:
    """A running cluster: its GCS address, the folder each node keeps its files in, the nodes by name,
    the head's dashboard (``http://127.0.0.1:PORT``, the Job Submission API)."""

    address: str
    token: str
    root: Path
    cluster: Any
    nodes: dict[str, Any] = field(default_factory=dict)
    dashboard: str = ""

    @property
    def token_file(self) -> Path:
        """A file (mode 0600) holding the cluster's token, as ``memel submit --token-file`` reads it."""
        return self.root / "auth_token"

    def driver_env(self, **extra: str) -> dict[str, str]:
        """The environment of a driver process (e.g. ``memel run --address``) for this cluster."""
        return {**os.environ, **self._ray_env(), **extra}

    def _ray_env(self) -> dict[str, str]:
        return {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_ADDRESS": self.address,
        }

    def node_folder(self, name: str) -> Path:
        """Where node ``name`` keeps its files (Ray's temp dir and TMPDIR)."""
        return self.root / name

    def session_files(self, name: str) -> list[Path]:
        """Every regular file Ray wrote in node ``name``'s session folders (logs, port and node records),
        not the unpacked runtime_env packages (``runtime_resources``: the job's own project files)."""
        sessions = [folder for folder in self.node_folder(name).glob("ray/session_*") if not folder.is_symlink()]
        return sorted(
            path
            for folder in sessions
            for path in folder.rglob("*")
            if path.is_file() and "runtime_resources" not in path.relative_to(folder).parts
        )

    def worker_logs(self, name: str) -> list[Path]:
        """Node ``name``'s worker log files."""
        return sorted(self.node_folder(name).glob("ray/session_*/logs/worker-*.out"))

    def worker_lines(self, name: str, text: str) -> list[str]:
        """The lines of node ``name``'s worker logs that hold ``text``."""
        return [
            line
            for log in self.worker_logs(name)
            for line in log.read_text(errors="replace").splitlines()
            if text in line
        ]

    def lose(self, name: str) -> None:
        """Take node ``name`` away: SIGKILL its raylet, object store, agents and workers."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)


@contextlib.contextmanager
def local_cluster(nodes: dict[str, dict[str, Any]], env: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """Start a head (``nodes``' first entry) and worker nodes; each value holds ``num_cpus`` and
    ``resources``; ``env`` is every node's own environment (e.g. its S3 credentials). Every
    node's processes are killed on exit."""
    from ray._private.utils import write_ray_address
    from ray.cluster_utils import Cluster

    root = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    handle = LocalCluster(address="", token=token, root=root, cluster=None)
    handle.token_file.write_text(token)
    handle.token_file.chmod(0o600)
    node_env = {**(env or {}), **{k: v for k, v in handle._ray_env().items() if k != "RAY_ADDRESS"}}
    saved = {key: os.environ.get(key) for key in [*node_env, "TMPDIR"]}
    os.environ.update(node_env)
    _reload_ray_config()
    cluster = None
    try:
        for index, (name, settings) in enumerate(nodes.items()):
            folder = root / name
            (folder / "tmp" / "ray").mkdir(parents=True)  # where Ray writes the address of the cluster it started
            os.environ["TMPDIR"] = str(folder / "tmp")  # what the node's processes (and their workers) inherit
            # one draw for the node's ports: two separate draws can return the same, just-freed port
            agent_port, dashboard_port = free_ports(LOOPBACK, 2)
            args = {
                "node_ip_address": LOOPBACK,
                "temp_dir": str(folder / "ray"),
                "object_store_memory": OBJECT_STORE_BYTES,
                "num_cpus": settings.get("num_cpus", 1),
                "resources": settings.get("resources", {}),
                # Ray's fixed default (52365) may be taken by another Ray on this machine; the head's
                # agent must listen for jobs to be submitted
                "dashboard_agent_listen_port": agent_port,
            }
            if index == 0:
                dashboard = {
                    "include_dashboard": True,
                    "dashboard_host": LOOPBACK,
                    "dashboard_port": dashboard_port,
                }
                handle.dashboard = f"http://{LOOPBACK}:{dashboard['dashboard_port']}"
                cluster = Cluster(
                    initialize_head=True, head_node_args={**args, **dashboard, "_system_config": FAST_HEALTH_CHECKS}
                )
                handle.cluster, handle.address = cluster, cluster.gcs_address
                handle.nodes[name] = cluster.head_node
                # where `ray start --head` records the address and a job's supervisor looks for it: without
                # it the supervisor gives the job any GCS it finds running here (another Ray's, too)
                write_ray_address(cluster.gcs_address, args["temp_dir"])
            else:
                handle.nodes[name] = cluster.add_node(**args)
        cluster.wait_for_nodes()
        _wait_for_dashboard(handle.dashboard, token)
        yield handle
    finally:
        if cluster is not None:
            cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _reload_ray_config()
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_dashboard(address: str, token: str) -> None:
    """Until the dashboard answers an authenticated request (the Job Submission API is up)."""
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + DASHBOARD_START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the head's dashboard at {address} did not answer in {DASHBOARD_START_TIMEOUT_S}s")
        time.sleep(0.5)


def _reload_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE once per process: read it again after it changed."""
    from ray._raylet import Config

    Config.initialize("")
