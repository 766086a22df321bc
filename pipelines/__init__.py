"""ptft pipeline layer: config, runner and CLI. `pipelines.run(config)` is the Python API."""

from pipelines.config import ConfigError, PipelineConfig, load_config
from pipelines.runner import STAGES, PipelineResult, run

__all__ = ["STAGES", "ConfigError", "PipelineConfig", "PipelineResult", "load_config", "run"]
