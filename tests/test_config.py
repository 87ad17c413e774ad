import re
import subprocess
import sys

import pytest
import yaml

from deephemnma.config import ConfigError, check_config

from .conftest import REPO

SCHEMA = REPO / "config" / "schema.yaml"


def default_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def test_default_config_is_valid():
    check_config(default_config(), SCHEMA)


@pytest.mark.parametrize(
    ("patch", "key", "problem"),
    [
        ({"nma": {"n_modes": "three"}}, "nma.n_modes", "is not of type 'integer'"),
        ({"bogus": 1}, "(top level)", "'bogus' was unexpected"),
        ({"particles": {"source": "mars"}}, "particles.source", "is not one of"),
        ({"hemnma": {"shards": 0}}, "hemnma.shards", "less than the minimum"),
    ],
)
def test_invalid_config_names_key(patch, key, problem):
    cfg = default_config()
    for k, v in patch.items():
        cfg[k] = {**cfg[k], **v} if isinstance(cfg.get(k), dict) else v
    with pytest.raises(ConfigError, match=f"key {re.escape(repr(key))}.*{re.escape(problem)}"):
        check_config(cfg, SCHEMA)


def snakemake(*args, cwd=REPO):
    exe = [sys.executable, "-m", "snakemake"]
    return subprocess.run([*exe, *args], cwd=cwd, capture_output=True, text=True)


def test_snakemake_reports_bad_config_and_missing_file():
    r = snakemake("-n", "--config", 'nma={"n_modes": "three"}')
    assert r.returncode != 0
    assert "invalid config: key 'nma.n_modes'" in r.stdout + r.stderr
    r = snakemake("-n", "--config", "structure=nowhere.pdb")
    assert r.returncode != 0
    assert "config key 'structure': file 'nowhere.pdb' does not exist" in r.stdout + r.stderr
