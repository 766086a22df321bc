"""ptft pipeline layer: config, runner and CLI. `pipelines.run(config)` is the Python API.

The runner (Ray, torch, MLflow) is imported on first use so that config work stays fast.
"""

from pipelines.pipeline_config import ConfigError, PipelineConfig, load_config

__all__ = ["STAGES", "ConfigError", "PipelineConfig", "PipelineResult", "load_config", "run"]


def __getattr__(name: str):
    if name in ("run", "STAGES", "PipelineResult"):
        from pipelines import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
