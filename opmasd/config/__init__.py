"""The daemon's configuration: `load_config` gives a checked, typed `Config` or a `ConfigError`.

schema.py says what a configuration holds, loading.py reads it from the file and the
environment, paths.py picks the default directories, parsers.py reads each kind of value.
"""

from __future__ import annotations

from opmasd.config.loading import ConfigError, load_config
from opmasd.config.paths import DefaultPaths, default_agent_dirs, default_paths
from opmasd.config.schema import (
    AgentsConfig,
    Config,
    DatabaseConfig,
    GrpcConfig,
    LogFormat,
    LogLevel,
    NatsConfig,
    RestConfig,
    ServiceConfig,
    TlsConfig,
)

__all__ = [
    "AgentsConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "DefaultPaths",
    "GrpcConfig",
    "LogFormat",
    "LogLevel",
    "NatsConfig",
    "RestConfig",
    "ServiceConfig",
    "TlsConfig",
    "default_agent_dirs",
    "default_paths",
    "load_config",
]
