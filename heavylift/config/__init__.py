from heavylift.config.errors import ConfigError, HeavyliftError
from heavylift.config.schema import (
    BatchConfig,
    EngineConfig,
    OffloadConfig,
    OptimConfig,
    PrecisionConfig,
    ScheduleConfig,
    validate,
)

__all__ = [
    "BatchConfig", "ConfigError", "EngineConfig", "HeavyliftError", "OffloadConfig", "OptimConfig",
    "PrecisionConfig", "ScheduleConfig", "validate",
]
