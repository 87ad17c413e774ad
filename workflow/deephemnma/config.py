"""Configuration checks that give one line naming the offending key."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import jsonschema
import yaml

from .files import InputError
from .io import count_star_rows
from .split import split_sizes


class ConfigError(ValueError):
    """An invalid workflow configuration; the message names the key."""


def check_config(config: dict, schema_path: str | Path) -> None:
    """Raise ConfigError with one line (key and problem) if `config` violates the schema."""
    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ConfigError(f"invalid config: key '{key}': {error.message}")


def cli_flags(
    section: Mapping,
    skip: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    prefix: str = "",
) -> list:
    """Command-line arguments of a config section, by one rule: key `a_b` → `--a-b` (a nested
    section's keys → `--section-key`), a list → the flag and each value, True → `--a-b`, False →
    `--no-a-b`, None → omitted. `skip` names keys that are not the verb's options (dotted for
    nested ones); `rename` maps keys whose option is named otherwise."""
    skip, rename = set(skip), dict(rename or {})
    args: list = []
    for key, value in section.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if dotted in skip or value is None:
            continue
        if isinstance(value, Mapping):
            args += cli_flags(value, skip, rename, dotted)
            continue
        flag = "--" + rename.get(dotted, dotted.replace(".", "-").replace("_", "-"))
        if isinstance(value, bool):
            args.append(flag if value else flag.replace("--", "--no-", 1))
        elif isinstance(value, (list, tuple)):
            args += [flag, *value]
        else:
            args += [flag, value]
    return args


def particle_count(config: dict) -> tuple[int, str] | None:
    """(number of particles, config key it comes from) if known before anything runs:
    particles.simulate.n_images, or the rows of the particles.import.star file."""
    particles = config["particles"]
    if particles["source"] == "simulate":
        return particles["simulate"]["n_images"], "particles.simulate.n_images"
    star = particles["import"]["star"]
    n = count_star_rows(star) if star is not None and Path(star).is_file() else None
    return None if n is None else (n, "particles.import.star")


def check_sizes(config: dict) -> None:
    """Raise ConfigError (one line naming the keys) for a HEMNMA subset or shard count, hybrid
    shard count, or validation and test sizes, that do not fit the particles, or for settings
    that need what the run will not have (schema defaults filled in)."""
    hemnma, network = config["hemnma"], config["network"]
    subset, shards = hemnma["subset"], hemnma["shards"]
    n, source = particle_count(config) or (None, None)
    if subset is not None and n is not None and subset > n:
        raise ConfigError(
            f"invalid config: key 'hemnma.subset': {subset} is more than the {n} particles "
            f"('{source}')"
        )
    aligned = subset if subset is not None else n
    if aligned is not None and aligned < shards:
        keys = "keys 'hemnma.subset', 'hemnma.shards'" if subset else "key 'hemnma.shards'"
        raise ConfigError(
            f"invalid config: {keys}: {shards} shards for {aligned} images (some would be empty)"
        )
    hybrid = config["hybrid"]
    if hybrid["enabled"] and subset is not None and n is not None and subset <= n:
        refined = n - subset
        if hybrid["select"] == "uncertain":
            refined = math.ceil(hybrid["fraction"] * refined)
        if refined < hybrid["shards"]:
            raise ConfigError(
                f"invalid config: key 'hybrid.shards': {hybrid['shards']} shards for the "
                f"{refined} images without HEMNMA values (some would be empty)"
            )
    imported = config["particles"]["source"] == "import"
    if hemnma["start"] == "priors" and not imported:
        raise ConfigError(
            "invalid config: key 'hemnma.start': priors needs the consensus poses of "
            "particles.source import"
        )
    if config["analysis"]["reconstruct"]["box"] == "original" and not imported:
        raise ConfigError(
            "invalid config: key 'analysis.reconstruct.box': original needs particles.source import"
        )
    if config["analysis"]["source"] == "hybrid" and not hybrid["enabled"]:
        raise ConfigError(
            "invalid config: key 'analysis.source': hybrid needs hybrid.enabled (or "
            "analysis.source merged)"
        )
    gives = network["angle_repr"] == "so3grid" or "amplitudes" in network["params"]
    if hybrid["select"] == "uncertain" and not gives:
        raise ConfigError(
            "invalid config: key 'hybrid.select': uncertain needs per-image uncertainties, "
            "which so3grid angles (network.angle_repr) or the amplitude network give"
        )
    needed = {"angles", "shifts", "amplitudes"} - set(network["params"])
    if hybrid["enabled"] and subset is not None and needed:
        raise ConfigError(
            "invalid config: key 'hybrid.enabled': the hybrid starts from the angle, shift and "
            f"amplitude networks' answers; network.params lacks {', '.join(sorted(needed))} "
            "(or set hybrid.enabled: false)"
        )
    labelled = aligned if network["label_source"] == "hemnma" else n
    if labelled is not None:
        try:
            split_sizes(labelled, network["n_val"], network["n_test"])
        except InputError as exc:
            raise ConfigError(
                f"invalid config: keys 'network.n_val', 'network.n_test': {exc}"
            ) from None
