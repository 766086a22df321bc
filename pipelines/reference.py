"""Generate the config reference (docs/config.md) from the schema, so the two never drift.

python -m pipelines.reference > docs/config.md
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pipelines.pipeline_config import PipelineConfig


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or re.sub(r"\b(typing|components\.schemas|pipelines\.pipeline_config)\.", "", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return "" if isinstance(value, BaseModel) else json.dumps(value, default=str)
    return "required" if field.default is PydanticUndefined else json.dumps(field.default)


def _rows(model: type[BaseModel], prefix: str, seen: set) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        if nested and all(m.__name__.endswith("Config") for m in nested):
            for sub in nested:
                rows += _rows(sub, f"{key}.", seen)
            continue
        cells = [f"`{key}`", _type_name(field.annotation), _default(field), field.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        for sub in nested:
            if sub not in seen:
                seen.add(sub)
    return rows


def render() -> str:
    seen: set = set()
    lines = [
        "# Config reference",
        "",
        "Generated from `components/schemas.py` by `python -m pipelines.reference`.",
        "Override any key on the command line: `ptft run CONFIG key.path=value`.",
        "",
        "| key | type | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    lines += _rows(PipelineConfig, "", seen)
    for model in sorted(seen, key=lambda m: m.__name__):
        lines += [
            "",
            f"## {model.__name__}",
            "",
            (model.__doc__ or "").strip(),
            "",
            "| key | type | default | meaning |",
            "| --- | --- | --- | --- |",
        ]
        lines += _rows(model, "", set())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
