"""The cluster token for Ray's token authentication (``RAY_AUTH_MODE=token``).

Ray 2.60's dashboard (and so the Job Submission API) accepts a request only with
``Authorization: Bearer <token>``. Ray's own clients find the token in this order:
``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``, but send
it only when ``RAY_AUTH_MODE=token`` is set on the client too. memel looks in the same places
(after ``--token-file``) and always sends the token it finds, so a submitter needs nothing but
the token. The token is never printed: only where it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SubmissionError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"
LOOKUP_ORDER = (
    f"--token-file PATH, then ${TOKEN_ENV}, then the file named by ${TOKEN_PATH_ENV}, then {DEFAULT_TOKEN_FILE}"
)
HOW_TO_PROVIDE = (
    "get the cluster's token on its head node with `ray get-auth-token` (Ray keeps it in ~/.ray/auth_token "
    f"there, or in ${TOKEN_ENV}), save it in a file readable only by you and pass --token-file FILE "
    f"(or set {TOKEN_PATH_ENV}=FILE, or {TOKEN_ENV})"
)


@dataclass(frozen=True)
class ClusterToken:
    """A token (or none) and where it was found; ``repr`` never shows the value."""

    value: str | None = field(repr=False)
    source: str

    def headers(self) -> dict[str, str]:
        """The HTTP headers that carry the token (empty without one)."""
        return {"Authorization": f"Bearer {self.value}"} if self.value else {}


def _read(path: Path, what: str) -> str:
    try:
        token = path.expanduser().read_text().strip()
    except OSError as error:
        raise SubmissionError(
            f"{what}: cannot read {str(path)!r} ({error.strerror or error}); {HOW_TO_PROVIDE}"
        ) from None
    if not token:
        raise SubmissionError(f"{what}: {str(path)!r} is empty; {HOW_TO_PROVIDE}")
    return token


def find_token(token_file: Path | None = None, environ: Mapping[str, str] | None = None) -> ClusterToken:
    """The cluster token from ``token_file``, else from where Ray itself looks (see ``LOOKUP_ORDER``).

    An explicit ``--token-file`` or ``RAY_AUTH_TOKEN_PATH`` that cannot be read is an error (as in
    Ray); finding no token at all is not: a cluster without authentication needs none.
    """
    env = os.environ if environ is None else environ
    if token_file is not None:
        return ClusterToken(_read(token_file, "--token-file"), f"--token-file {token_file}")
    if env.get(TOKEN_ENV, "").strip():
        return ClusterToken(env[TOKEN_ENV].strip(), f"${TOKEN_ENV}")
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV])
        return ClusterToken(_read(path, TOKEN_PATH_ENV), f"${TOKEN_PATH_ENV} ({path})")
    default = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        token = default.read_text().strip()
        if token:
            return ClusterToken(token, str(default))
    return ClusterToken(None, "none found")
