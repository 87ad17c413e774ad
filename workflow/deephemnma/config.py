"""Configuration checks that give one line naming the offending key."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml


class ConfigError(ValueError):
    """An invalid workflow configuration; the message names the key."""


def check_config(config: dict, schema_path: str | Path) -> None:
    """Raise ConfigError with one line (key and problem) if `config` violates the schema."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"invalid config: key '{key}': {error.message}")
