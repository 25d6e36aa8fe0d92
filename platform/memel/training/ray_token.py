"""The embedded Ray's cluster token, kept private to this user.

Ray (2.59 and later) turns token authentication on for a new local instance and, when no token
exists, writes one to ``~/.ray/auth_token`` with the umask's mode: usually 0644, so every user
of the machine could read it and submit code to this user's Ray. Before the embedded Ray starts,
:func:`ensure_private_token` creates that file itself, mode 0600 in a 0700 folder, or takes
the group and world permissions off one this user already owns. Nothing is done where Ray would
not read that file: ``RAY_AUTH_MODE`` set to something other than ``token``, or a token given by
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` (the operator's own choice).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("memel.training")

#: Where Ray looks for its token when no variable names one.
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"


def ensure_private_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path | None:
    """The default token file, created (or tightened) so that only this user can read it; None when
    Ray will not read it (token auth off, or the token comes from a variable)."""
    env = os.environ if environ is None else environ
    mode = env.get("RAY_AUTH_MODE")
    if mode is not None and mode.strip().lower() != "token":
        return None
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = (home if home is not None else Path.home()) / DEFAULT_TOKEN_FILE
    folder = path.parent
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _tighten(path)
        return path
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))  # as Ray generates its own: 256 bits
    return path


def _tighten(path: Path) -> None:
    """Take group and world access off ``path`` when this user owns it (another's file is left alone)."""
    try:
        info = path.stat()
        if info.st_uid == os.getuid() and info.st_mode & 0o077:
            path.chmod(stat.S_IMODE(info.st_mode) & 0o700)
            log.info("%s was readable by other users; now 0600", path)
    except OSError as error:
        log.warning("could not check the permissions of %s: %s", path, error)
