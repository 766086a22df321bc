"""Credentials never leave in clear: what ptft prints, stores (manifest, config, report) or logs to
MLflow goes through here. URLs are parsed, not pattern-matched on `user:password@`, so passwords
with `/`, `?`, `#` or `@` and credential query keys (`token=`, `sig=`) are caught too."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

# Names that hold credentials: never logged as params or tags, whatever their source.
_SECRET_WORDS = ("token", "password", "passwd", "secret", "api_key", "apikey", "access_key", "credential")


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """Drop credential-named keys and strip `user:password@` from URL values."""
    return {key: redact_url(value) for key, value in values.items() if not is_secret_name(key)}


def redact_tree(values: Mapping[str, Any]) -> dict[str, Any]:
    """`redact` through nested mappings (a resolved config before it is stored as an artifact)."""
    return {key: redact_tree(value) if isinstance(value, Mapping) else value for key, value in redact(values).items()}


REDACTED = "***"
# Query keys that carry a credential: MLflow/Databricks tokens, S3 presigned and Azure SAS signatures.
_SECRET_QUERY_WORDS = (*_SECRET_WORDS, "sig", "signature", "key", "auth")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def redact_url(value: Any) -> Any:
    """A URL with its credentials replaced by `***`: `user:password@` (also when the password holds
    a raw `/`, `?`, `#` or `@`, which database drivers accept) and the values of credential query
    keys (`token=`, `sig=`, `password=`, ...). Anything that is not a URL comes back unchanged."""
    if not isinstance(value, str) or "://" not in value:
        return value
    scheme, rest = value.split("://", 1)
    if not _SCHEME.fullmatch(scheme):
        return value
    rest = _without_userinfo(rest)
    parts = urllib.parse.urlsplit(f"{scheme}://{rest}")
    query = "&".join(_redacted_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urllib.parse.urlunsplit(parts._replace(query=query)) if query != parts.query else f"{scheme}://{rest}"


def _without_userinfo(rest: str) -> str:
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:  # RFC 3986: the userinfo ends at the authority's last "@"
        return REDACTED + rest[authority.rindex("@") :]
    user, colon, after = authority.partition(":")
    if colon and "@" in rest and not after.isdigit():
        # `user:pa/ss@host`: a raw "/" (or "?", "#") in the password ended the authority early. What
        # reads like `host:port/...@...` is kept; anything else is taken as credentials.
        return REDACTED + rest[rest.rindex("@") :]
    return rest


def _redacted_pair(pair: str) -> str:
    key, equals, _ = pair.partition("=")
    secret = equals and any(word in urllib.parse.unquote(key).lower() for word in _SECRET_QUERY_WORDS)
    return f"{key}={REDACTED}" if secret else pair


def redacted_urls(tree: Any) -> Any:
    """Every URL in a nested config redacted, keys kept (what a run stores on disk)."""
    if isinstance(tree, Mapping):
        return {key: redacted_urls(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [redacted_urls(value) for value in tree]
    return redact_url(tree)


class CredentialsNeeded(ValueError):
    """A recorded tracking URI held credentials, which ptft never stores."""


def connectable_uri(recorded: str | None) -> str | None:
    """The URI to reach a run's MLflow with, given the (redacted) one its manifest recorded: the
    recorded one when nothing was taken out of it, else MLFLOW_TRACKING_URI when that is the same
    URI with its credentials."""
    if not recorded or REDACTED not in recorded:
        return recorded
    given = os.environ.get("MLFLOW_TRACKING_URI")
    if given and redact_url(given) == recorded:
        return given
    raise CredentialsNeeded(
        f"the run's tracking URI {recorded} held credentials, which ptft does not store: "
        "set MLFLOW_TRACKING_URI to that URI with its credentials"
    )


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """Every URL in a message redacted (errors from MLflow or requests quote the URL they called)."""
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)
