"""Credentials inside URIs, hidden before a URI is stored or shown.

:func:`redact` is the one place memel hides them: ``http://user:pw@host`` becomes
``http://user:***@host``, a lone userinfo (``https://TOKEN@host``, usually a token) becomes
``***@``, and secret-looking query parameters (``?token=...``, ``&X-Amz-Signature=...``) keep
their name but lose their value. The values of the secret variables in ``SECRET_ENV`` (and any
``secrets`` passed) are replaced by ``***`` wherever they appear. It works on a bare URI and on
free text (a log line, an error message); text without credentials comes back unchanged.
:func:`is_secret_key` says which named values (params, tags, environment variables) are
secrets by their name alone: those are never logged at all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"

#: Query-parameter name fragments whose values are secrets (compared lower-case, "-" as "_").
SECRET_QUERY_MARKERS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "signature",
    "credential",
    "api_key",
    "apikey",
    "access_key",
    "auth",
    "sig",
)

#: Environment variables whose values :func:`redact` hides in any text.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "RAY_AUTH_TOKEN",
)

#: Key fragments that mark a named value (a param, a tag, a variable) as a secret.
SECRET_MARKERS = ("secret", "password", "passwd", "token", "access_key", "secret_key", "credential", "api_key")

#: Shorter values are not replaced (they would garble ordinary words).
MIN_SECRET_LENGTH = 4

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#@]*(?:@[^/\s?#@]*)*)@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&#;\s'\"]*)")


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) key names a secret, judging by its name."""
    lowered = key.lower().replace("-", "_")
    return any(marker in lowered for marker in SECRET_MARKERS)


def _is_secret_param(name: str) -> bool:
    lowered = name.lower().replace("-", "_")
    return any(marker in lowered for marker in SECRET_QUERY_MARKERS)


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match.group("userinfo").partition(":")
    shown = f"{user}:{MASK}" if colon else MASK
    return f"{match.group('scheme')}{shown}@"


def _mask_param(match: re.Match[str]) -> str:
    if not match.group("value") or not _is_secret_param(match.group("name")):
        return match.group(0)
    return f"{match.group('lead')}{match.group('name')}={MASK}"


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URI credential, every ``SECRET_ENV`` value and every one of ``secrets``
    replaced by ``***`` (see the module doc)."""
    values = {*secrets, *(os.environ.get(name) for name in SECRET_ENV)}
    for value in sorted((v for v in values if v and len(v) >= MIN_SECRET_LENGTH), key=len, reverse=True):
        text = text.replace(value, MASK)
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    return _QUERY_PARAM.sub(_mask_param, text) if "?" in text else text


def redact_tree(value: Any) -> Any:
    """A copy of nested mappings/lists with :func:`redact` applied to every string."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {key: redact_tree(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(item) for item in value]
    return value


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """(``uri`` without its ``user:password@`` part, the user name, the password), decoded."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(user) or None, unquote(password) if colon else None
