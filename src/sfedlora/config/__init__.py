"""Typed run configuration: pydantic models per section, YAML loading and ``--set a.b=c`` overrides."""

from .federation import (
    EvalConfig,
    FaultConfig,
    FederationConfig,
    FlowerConfig,
    ServerConfig,
    SimulatorConfig,
    TrainConfig,
)
from .loading import (
    NON_RESULT_KEYS,
    apply_overrides,
    build_config,
    dump_config,
    load_config,
    parse_override,
    read_yaml_mapping,
    result_differences,
)
from .model import DataConfig, LoraSettings, ModelConfig, PartitionConfig
from .privacy import PrivacyConfig
from .run import RunConfig

__all__ = [
    "DataConfig",
    "EvalConfig",
    "FaultConfig",
    "FederationConfig",
    "FlowerConfig",
    "LoraSettings",
    "ModelConfig",
    "NON_RESULT_KEYS",
    "PartitionConfig",
    "PrivacyConfig",
    "RunConfig",
    "ServerConfig",
    "SimulatorConfig",
    "TrainConfig",
    "apply_overrides",
    "build_config",
    "dump_config",
    "load_config",
    "parse_override",
    "read_yaml_mapping",
    "result_differences",
]
