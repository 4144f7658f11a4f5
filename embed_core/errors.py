"""Errors raised by embed_core. Each message names the fix."""


class EmbedCoreError(Exception):
    """Base class for embed_core errors."""


class ConfigError(EmbedCoreError, ValueError):
    """A configuration value is invalid (unknown name, bad size, missing path...)."""


class DataError(EmbedCoreError, ValueError):
    """Training or evaluation data is missing, malformed, or would leak an evaluation split."""
