"""Types of the command line's options: a number or address that cannot work is a usage error
(exit 2) naming the option, before anything starts."""

from __future__ import annotations

import argparse
import re
import urllib.parse
from pathlib import Path

from components.net import bind_address_problem
from components.schemas import SEED_MAX, registry_name_problem
from pipelines.pipeline_config import Problem


def port(text: str) -> int:
    value = _whole(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is no TCP port: use 1-65535")
    return value


def positive_int(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: use a whole number of at least 1")
    return value


def positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: use a number of seconds above 0")
    return value


def seconds_or_zero(text: str) -> float:
    value = _seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: use a number of seconds, or 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value != value or value == float("inf"):  # nan, inf
        raise argparse.ArgumentTypeError(f"{text}: use a finite number of seconds")
    return value


def seed(text: str) -> int:
    value = _whole(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text}: use a seed from 0 to {SEED_MAX}")
    return value


def host(text: str) -> str:
    if problem := bind_address_problem(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}; use an IP address (127.0.0.1, 0.0.0.0) or a host name")
    return text


def registry_name(text: str) -> str:
    """A pipeline name: it names the registered models and folders, so MLflow's rules hold."""
    if problem := registry_name_problem(text):
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}; use letters, digits, '-' and '_'")
    return text


def dashboard_url(text: str) -> str:
    """The Ray dashboard's URL, http(s)://HOST:PORT, as the job commands send it."""
    url = urllib.parse.urlsplit(text)
    example = "http://HEAD:8265"
    if url.scheme not in ("http", "https"):
        if re.fullmatch(r"[^/:]+:\d+", text):  # HOST:PORT without the scheme
            example = f"http://{text}"
        raise argparse.ArgumentTypeError(f"{text!r} is not the dashboard's URL: use {example}")
    try:
        url.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}; use {example}") from None
    if not url.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} names no host: use {example}")
    return text


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def output_file_problems(key: str, path: str, example: str, suffixes: tuple[str, ...] = ()) -> list[Problem]:
    """Why a file cannot be written at `path` (in a format its suffix names, when `suffixes` are
    given), checked before the work that makes it; its folder is made here when missing."""
    target = Path(path)
    if target.is_dir():
        return [Problem(key, path, "a folder", f"name a file in it, e.g. {target / example}")]
    if suffixes and target.suffix.lower() not in suffixes:
        why = f"ends in {target.suffix or 'no suffix'}, not one of {', '.join(suffixes)}"
        return [Problem(key, path, why, f"name a file ending in {suffixes[0]}")]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return [Problem(key, path, f"its folder cannot be made ({error.strerror})", "name a file in a writable folder")]
    return []
