"""The workflow through Snakemake: DAG, a full tiny run, partial reruns, report."""

import fcntl
import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from .conftest import CLOSED_PDB, OPEN_PDB, REPO

pytestmark = pytest.mark.slow


def snakemake(workdir, *args, check=True):
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--cores",
        "2",
        *args,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def planned_jobs(workdir, **changes):
    """{rule: count} that a dry run would execute with the config changed (then restored)."""
    write_config(workdir, **changes)
    try:
        out = snakemake(workdir, "-n").stdout
    finally:
        write_config(workdir)
    if "Nothing to be done" in out:
        return {}
    stats = out.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "job"}


def write_config(workdir, **changes):
    cfg = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text(encoding="utf-8"))
    cfg["structure"] = str(OPEN_PDB)
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A complete run of the tiny workflow."""
    wd = tmp_path_factory.mktemp("wf")
    write_config(wd)
    snakemake(wd)
    return wd


def test_dry_run_plans_the_whole_dag(tmp_path):
    write_config(tmp_path)
    jobs = planned_jobs(tmp_path)
    assert jobs == {
        "prepare_model": 1,
        "nma": 1,
        "simulate": 1,
        "shard": 1,
        "hemnma": 2,
        "gather": 1,
        "split": 1,
        "synthesize": 1,
        "train": 3,
        "infer": 3,
        "quality": 1,
        "merge": 1,
        "evaluate": 1,
        "hybrid_select": 1,
        "hybrid_refine": 2,
        "hybrid": 1,
        "space": 1,
        "reconstruct": 2,
        "fsc": 2,
        "all": 1,
    }


def test_second_instance_on_the_same_results_folder_stops(tmp_path):
    """Another working directory, the same results folder: a run stops while the other holds it."""
    shared, wd = tmp_path / "shared", tmp_path / "b"
    shared.mkdir()
    wd.mkdir()
    write_config(wd, results=str(shared))
    target = str(shared / "model/model.npz")
    # as held by a running instance
    with open(shared / ".deephemnma.lock", "a+", encoding="utf-8") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 4242 on node7 in /elsewhere\n")
        other.flush()
        r = snakemake(wd, target, check=False)
        assert r.returncode != 0
        busy = f"results folder '{shared.resolve()}' is in use by pid 4242 on node7 in /elsewhere"
        assert busy in r.stderr
        assert not (shared / "model").exists()
        assert "prepare_model" in snakemake(wd, "-n", target).stdout  # dry runs take no lock
    snakemake(wd, target)
    assert (shared / "model/model.npz").exists()
    assert f"in {wd}" in (shared / ".deephemnma.lock").read_text(encoding="utf-8")


def test_several_structures_add_a_reference_each(tmp_path):
    write_config(tmp_path, structure=[str(OPEN_PDB), str(CLOSED_PDB)])
    out = snakemake(tmp_path, "-n", "-p").stdout
    stats = out.split("Job stats:")[1].split("total")[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}
    assert jobs["prepare_model"] == jobs["prepare_reference"] == 1
    assert jobs["nma"] == jobs["nma_reference"] == 1
    assert "--model results/model/model.npz results/model/reference_2/model.npz" in out
    assert "--modes results/model/modes.npz results/model/reference_2/modes.npz" in out


def test_reference_update_chains_the_passes(tmp_path):
    """Two reference updates with two k-means groups: pass 0 against the model, a fit per group
    and update reading the pass before, the last pass (hemnma/hemnma.star) against the model and
    update 2's fitted references; every new command parses with its verb's parser."""
    import shlex

    from deephemnma.cli import build_parser

    ru = "hemnma.reference_update"
    write_config(tmp_path, **{f"{ru}.iterations": 2, f"{ru}.grouping": "kmeans"})
    out = snakemake(tmp_path, "-n", "-p").stdout
    stats = out.split("Job stats:")[1].split("total")[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)}
    assert (jobs["hemnma_pass"], jobs["gather_pass"], jobs["fit"]) == (4, 2, 4)
    assert (jobs["hemnma"], jobs["gather"]) == (2, 1)
    for u, g in [(1, 0), (1, 1), (2, 0), (2, 1)]:
        assert (
            f"--particles results/hemnma/pass_{u - 1}/hemnma.star --model results/model/model.npz"
            f" --modes results/model/modes.npz --pdb results/model/model.pdb --group {g} "
        ) in out
    fitted = " ".join(f"results/model/update_2/reference_{g}/model.npz" for g in (0, 1))
    assert f"--model results/model/model.npz {fitted} " in out
    assert "--out results/hemnma/aligned/shard_0.star" in out
    # the hybrid refines against the last pass's references: its costs are judged against it
    hybrid = re.findall(r"--particles results/hybrid/shards/\S+ --model ([^-]+) --modes", out)
    assert hybrid == [f"results/model/model.npz {fitted}"] * 2
    commands = re.findall(r"(?:^|\s)(deephemnma (?:fit|hemnma|gather) [^\n]*)", out)
    for command in commands:
        words = shlex.split(command)
        words = words[: words.index(">")] if ">" in words else words
        try:
            build_parser(words[1]).parse_args(words[1:])
        except SystemExit as exc:
            raise AssertionError(f"not accepted by `deephemnma {words[1]}`: {command}") from exc


def test_full_run_outputs(done):
    import starfile

    net = starfile.read(done / "results/network/deephemnma.star")
    assert len(net["particles"]) == 120
    assert net["particles"]["dhHemnmaLabelled"].sum() == 60
    assert "rlnPhaseShift" in net["particles"]
    quality = (done / "results/network/quality.json").read_text(encoding="utf-8")
    verdicts = json.loads(quality)["networks"]
    assert {v["param"] for v in verdicts} == {"amplitudes", "angles", "shifts"}
    trusted = net["particles"]["dhTrusted"]
    explained = net["particles"]["dhFlagged"] == 0  # images HEMNMA flagged are never trusted
    if all(v["trusted"] for v in verdicts):
        assert (trusted == explained).all()
    else:  # untrusted networks: the images HEMNMA aligned keep HEMNMA's values and trust
        labelled = net["particles"]["dhHemnmaLabelled"] == 1
        assert (trusted == (labelled & explained)).all()
    # the space is built from the hybrid's trusted images (analysis.source: hybrid, as the demo)
    hybrid = starfile.read(done / "results/network/hybrid.star")["particles"]
    space = pd.read_csv(done / "results/space/space.csv")
    assert len(space) == hybrid["dhTrusted"].sum() and set(space["source"]) <= {"hemnma", "hybrid"}
    log = (done / "results/logs/quality.log").read_text(encoding="utf-8")
    assert all(v["text"] in log for v in verdicts)
    hem = starfile.read(done / "results/hemnma/hemnma.star")["particles"]
    assert len(hem) == 60 and "dhCost" in hem
    assert {"dhCostZ", "dhFlagged"} <= set(hem) and "dhReference" not in hem
    verdict = (done / "results/hemnma/verdict.md").read_text(encoding="utf-8")
    assert f"{int(hem['dhFlagged'].sum())} of 60 images" in verdict
    trust = (done / "results/network/trust.md").read_text(encoding="utf-8")
    assert f"{int(trusted.sum())} of 120 images trusted" in trust
    flags = hem.set_index("rlnImageName")["dhFlagged"]  # merge keeps HEMNMA's flag
    on_hemnma = net["particles"].set_index("rlnImageName").loc[flags.index, "dhFlagged"]
    assert (on_hemnma == flags).all()
    flagged = set(hybrid.loc[hybrid["dhFlagged"] == 1, "rlnImageName"])
    assert not flagged & set(space["rlnImageName"])  # nor is any flagged image in the space
    assert (done / "results/evaluate/accuracy.md").read_text(encoding="utf-8").count("|") > 20
    for g in (0, 1):
        assert (done / f"results/maps/group_{g}.mrc").stat().st_size > 32**3 * 4
    assert (done / "results/benchmarks/hemnma/shard_0.tsv").exists()


def test_hybrid_output_has_every_image_with_its_source(done):
    import starfile

    merged = starfile.read(done / "results/network/deephemnma.star")["particles"]
    out = starfile.read(done / "results/network/hybrid.star")["particles"]
    assert list(out["rlnImageName"]) == list(merged["rlnImageName"]) and len(out) == 120
    labelled = out["dhHemnmaLabelled"] == 1
    for param in ("Angles", "Shifts", "Amplitudes"):
        assert (out.loc[labelled, f"dhSource{param}"] == "hemnma").all()
        assert (out.loc[~labelled, f"dhSource{param}"] == "hybrid").all()
    same = ["rlnAngleRot", "dhAmplitudeMode7"]
    assert (out.loc[labelled, same] == merged.loc[labelled, same]).all().all()
    assert (out.loc[~labelled, "rlnAngleRot"] != merged.loc[~labelled, "rlnAngleRot"]).all()
    verdict = (done / "results/network/hybrid.md").read_text(encoding="utf-8")
    assert f"{int((~labelled).sum())} of 120 images refined" in verdict
    # the hybrid started from the angle network's 8 orientation candidates (hybrid.candidates)
    assert [c for c in merged if c.startswith("dhAngleCandidate")][-1] == "dhAngleCandidate8Psi"


def test_local_settings_rerun_only_the_hybrid(done):
    # the hybrid and what reads it (analysis.source: hybrid): the space, its maps, the evaluation
    after = {"hybrid", "evaluate", "space", "reconstruct", "fsc"}
    jobs = planned_jobs(done, **{"hemnma.local.max_angle_deg": 7.0})
    assert set(jobs) - {"all"} == {"hybrid_refine", *after} and jobs["hybrid_refine"] == 2
    jobs = planned_jobs(done, **{"hybrid.select": "uncertain"})
    assert set(jobs) - {"all"} == {"hybrid_select", "hybrid_refine", *after}


def test_nothing_reruns_after_complete_run(done):
    assert planned_jobs(done) == {}


def test_training_parameter_reruns_only_its_branch(done):
    jobs = planned_jobs(done, **{"network.epochs": 3})
    assert jobs.get("train") == 3 and jobs.get("infer") == 3 and "synthesize" not in jobs
    assert {"quality", "merge", "space", "reconstruct", "fsc", "evaluate"} <= set(jobs)
    assert not {"prepare_model", "nma", "simulate", "shard", "hemnma", "gather", "split"} & set(
        jobs
    )
    jobs = planned_jobs(done, **{"network.pretrain.images": 300})
    assert jobs.get("synthesize") == 1 and jobs.get("train") == 3
    assert not {"simulate", "hemnma", "split"} & set(jobs)


def test_nma_cutoff_reruns_everything_downstream(done):
    jobs = planned_jobs(done, **{"nma.cutoff": 12.0})
    assert "nma" in jobs and "prepare_model" not in jobs
    assert {"simulate", "hemnma", "train", "infer", "space", "reconstruct", "fsc"} <= set(jobs)


def test_new_structure_reruns_everything(done, tmp_path):
    other = tmp_path / "other.pdb"
    shutil.copy(CLOSED_PDB, other)
    jobs = planned_jobs(done, structure=str(other))
    assert {"prepare_model", "nma", "simulate", "hemnma", "train", "fsc"} <= set(jobs)


def test_failed_shard_reruns_alone(done):
    """As after a run that died in shard 1: its output and the gathered STAR are missing."""
    shard0 = done / "results/hemnma/aligned/shard_0.star"
    before = shard0.stat().st_mtime_ns
    (done / "results/hemnma/aligned/shard_1.star").unlink()
    (done / "results/hemnma/hemnma.star").unlink()
    out = snakemake(done, "-n", "results/hemnma/hemnma.star").stdout
    stats = out.split("Job stats:")[1].split("total")[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M) if m[1] != "job"}
    assert jobs == {"hemnma": 1, "gather": 1}
    snakemake(done, "results/hemnma/hemnma.star")
    assert shard0.stat().st_mtime_ns == before
    assert (done / "results/hemnma/aligned/shard_1.star").exists()


def test_report_builds(done):
    snakemake(done, "--report", str(done / "report.html"))
    html = (done / "report.html").read_text(errors="ignore", encoding="utf-8")
    assert len(html) > 10000 and "pca.png" in html and "loss.png" in html


def schema_leaves(node: dict, path: str = ""):
    """Dotted paths of the schema's leaf keys."""
    for key, sub in node.get("properties", {}).items():
        dotted = f"{path}.{key}" if path else key
        if "properties" in sub:
            yield from schema_leaves(sub, dotted)
        else:
            yield dotted


def test_job_commands_parse_with_their_verbs_and_every_schema_key_is_read(tmp_path):
    """Each job's command line is accepted by its verb's own parser (no unknown flag, no missing
    value), and every key of the schema is read somewhere by the workflow (none silently unused)."""
    import shlex

    from deephemnma.cli import build_parser

    write_config(tmp_path)
    out = snakemake(tmp_path, "-n", "-p").stdout
    commands = re.findall(r"(?:^|\s)(deephemnma [a-z-]+ [^\n]*)", out)
    verbs = set()
    for command in commands:
        words = shlex.split(command)
        words = words[: words.index(">")] if ">" in words else words
        verb = words[1]
        verbs.add(verb)
        try:
            build_parser(verb).parse_args(words[1:])
        except SystemExit as exc:
            raise AssertionError(f"not accepted by `deephemnma {verb}`: {command}") from exc
    assert {"simulate", "hemnma", "train", "infer", "space", "reconstruct", "hybrid"} <= verbs
    schema = yaml.safe_load((REPO / "config/schema.yaml").read_text(encoding="utf-8"))
    code = "".join(
        p.read_text(encoding="utf-8")
        for p in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*"))]
    )
    code += (REPO / "workflow/deephemnma/config.py").read_text(encoding="utf-8")
    whole = [  # sections turned into flags as a whole: `cli_flags(config["a"]["b"], ...)`
        ".".join(re.findall(r'"(\w+)"', m)) + "."
        for m in re.findall(r"cli_flags\(\s*config((?:\[\"\w+\"\])+)", code)
    ]
    text = " ".join(commands)

    def read(key: str) -> bool:
        *_, parent, name = ["", *key.split(".")]
        flags = {name, f"no-{name}", f"{parent}-{name}"}
        return (
            f'["{name}"]' in code
            or any(key.startswith(w) for w in whole)
            or any(f"--{f.replace('_', '-')} " in text for f in flags)
        )

    unread = [k for k in schema_leaves(schema) if not read(k)]
    assert not unread, f"schema keys nothing reads: {unread}"
    assert whole, "no section is turned into flags by cli_flags"
