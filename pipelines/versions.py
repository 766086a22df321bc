"""ptft's version and those of the stack it runs on: `ptft --version` prints them (a bug report's
first line) and every pipeline run records them on its MLflow run (tag `ptft.versions`)."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

STACK = ("torch", "transformers", "deepspeed", "ray", "mlflow")


def versions() -> str:
    """From the installed packages' metadata: nothing is imported."""
    stack = ", ".join(f"{package} {_of(package)}" for package in STACK)
    return f"ptft {_of('ptft')} (Python {sys.version.split()[0]}; {stack})"


def _of(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
