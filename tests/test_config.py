import re
import subprocess
import sys

import pandas as pd
import pytest
import starfile
import yaml

from deephemnma.config import ConfigError, check_config, check_sizes

from .conftest import REPO

SCHEMA = REPO / "config" / "schema.yaml"


def default_config():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))


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


def filled_config(**changes):
    """The default config with dotted keys changed and the schema's defaults filled in."""
    from snakemake.utils import validate

    cfg = default_config()
    for key, value in changes.items():
        *path, last = key.split(".")
        node = cfg
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    validate(cfg, str(SCHEMA))
    return cfg


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"hemnma.subset": 1},
            "keys 'hemnma.subset', 'hemnma.shards': 2 shards for 1 images (some would be empty)",
        ),
        (
            {"hemnma.subset": None, "hemnma.shards": 4, "particles.simulate.n_images": 3},
            "key 'hemnma.shards': 4 shards for 3 images",
        ),
        (
            {"hemnma.subset": 1500},
            "key 'hemnma.subset': 1500 is more than the 1200 particles "
            "('particles.simulate.n_images')",
        ),
        (
            {"hemnma.subset": 1199, "hybrid.enabled": True},
            "key 'hybrid.shards': 2 shards for the 1 images without HEMNMA values",
        ),
        (
            {"hemnma.start": "priors"},
            "key 'hemnma.start': priors needs the consensus poses of particles.source import",
        ),
        (
            {"analysis.reconstruct.box": "original"},
            "key 'analysis.reconstruct.box': original needs particles.source import",
        ),
        (
            {"analysis.source": "hybrid", "hybrid.enabled": False},
            "key 'analysis.source': hybrid needs hybrid.enabled",
        ),
        (
            {"network.params": ["amplitudes"], "network.views": False},
            "key 'hybrid.enabled': the hybrid starts from the angle, shift and amplitude "
            "networks' answers; network.params lacks angles, shifts",
        ),
        (
            {
                "hybrid.select": "uncertain",
                "network.angle_repr": "6d",
                "network.params": ["angles", "shifts"],
            },
            "key 'hybrid.select': uncertain needs per-image uncertainties",
        ),
        (
            {"network.n_val": 250, "network.n_test": 50},
            "keys 'network.n_val', 'network.n_test': cannot split 300 labelled images into "
            "250 validation, 50 test",
        ),
    ],
)
def test_sizes_that_cannot_work_name_the_keys(changes, message):
    with pytest.raises(ConfigError, match=f"^invalid config: {re.escape(message)}"):
        check_sizes(filled_config(**changes))


def test_sizes_checked_against_what_is_labelled_and_imported(tmp_path):
    check_sizes(filled_config())
    # truth labels: all 1200 simulated images, not the HEMNMA subset of 300
    check_sizes(filled_config(**{"network.label_source": "truth", "network.n_val": 250}))
    star = tmp_path / "in.star"
    starfile.write(pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs", "3@a.mrcs"]}), star)
    imported = {"particles.source": "import", "particles.import.star": str(star)}
    with pytest.raises(
        ConfigError, match=r"300 is more than the 3 particles \('particles.import.star'\)"
    ):
        check_sizes(filled_config(**imported))
    check_sizes(filled_config(**imported, **{"hemnma.subset": None, "network.n_val": 1}))


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


def test_snakemake_reports_sizes_when_it_loads(tmp_path):
    (tmp_path / "subset.yaml").write_text("hemnma:\n  subset: 1\n", encoding="utf-8")
    r = snakemake("-n", "--configfile", str(tmp_path / "subset.yaml"))
    assert r.returncode != 0
    assert "invalid config: keys 'hemnma.subset', 'hemnma.shards': 2 shards for 1" in r.stdout


def test_real_data_example_and_all_images_aligned_plan_no_hybrid(tmp_path):
    """On top of the demo (hybrid on, space from it) the real-data example runs no hybrid and
    builds the space from the merged STAR; so does the demo with HEMNMA on every image
    (hemnma.subset null: nothing to refine)."""
    star = tmp_path / "p.star"
    names = pd.DataFrame({"rlnImageName": [f"{i}@a.mrcs" for i in range(1, 20001)]})
    starfile.write(names, star)
    cfg = yaml.safe_load((REPO / "config/examples/em_map.yaml").read_text(encoding="utf-8"))
    cfg["structure"] = str(REPO / "resources/adk_open.pdb")
    cfg["particles"]["import"]["star"] = str(star)
    (tmp_path / "em.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    (tmp_path / "all.yaml").write_text("hemnma:\n  subset: null\n", encoding="utf-8")
    for name in ("em.yaml", "all.yaml"):
        r = snakemake("-n", "--configfile", str(tmp_path / name))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "hybrid" not in r.stdout.split("Job stats:")[1].split("total")[0]
        assert re.search(r"rule space:\n\s+input: \S+/network/deephemnma\.star,", r.stdout)


def test_an_em_map_only_as_the_first_structure(tmp_path):
    (tmp_path / "map.mrc").write_bytes(b"")
    cfg = tmp_path / "two.yaml"
    cfg.write_text(
        f"structure: [resources/adk_open.pdb, {tmp_path / 'map.mrc'}]\n", encoding="utf-8"
    )
    r = snakemake("-n", "--configfile", str(cfg))
    assert r.returncode != 0
    assert (
        "config key 'structure': only the first structure may be an EM map" in r.stdout + r.stderr
    )


def test_every_cli_option_has_help_and_shows_its_default():
    """`deephemnma VERB --help` explains every option; defaults come from one formatter."""
    import argparse

    from deephemnma.cli import VERBS, build_parser

    for verb in VERBS:
        parser = build_parser(verb)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parsers = [sub.choices[verb]]
        for action in sub.choices[verb]._actions:  # nested steps (hybrid select|combine)
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
        for p in parsers:
            for action in p._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                assert action.help, f"{verb} {action.option_strings}: no help"
                shown = "%(default)" in p._get_formatter()._get_help_string(action)
                switch = isinstance(action, argparse.BooleanOptionalAction)
                has_default = action.default not in (None, argparse.SUPPRESS) and (
                    action.nargs != 0 or switch
                )
                assert shown == (has_default and not action.required), (verb, action.dest)
