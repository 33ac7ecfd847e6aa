"""Typed run configuration: dataclasses, YAML loading with dotted overrides, validation."""

from megaret.config.loader import apply_overrides, config_from_dict, dump_config, load_config, save_config
from megaret.config.schema import (
    SECTIONS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LaunchConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "SECTIONS",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LaunchConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "dump_config",
    "load_config",
    "save_config",
]
