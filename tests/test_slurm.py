"""The tiny workflow through the SLURM profile on a real single-node SLURM cluster (127.0.0.1).

The cluster (munged, slurmctld, slurmd; partitions cpu and gpu) is started by .ci/slurm-cluster.sh
in a temporary folder and stopped afterwards. Each job records its SLURM job id, partition and task
count in its log (the CLI logs them); the test reads them back, and asks slurmctld for the MPI jobs.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import OPEN_PDB, REPO

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
SCRIPT = REPO / ".ci" / "slurm-cluster.sh"


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start slurmctld/slurmd/munged"
    tools = [
        t
        for t in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol")
        if shutil.which(t) is None
    ]
    if tools:
        return (
            f"SLURM not installed ({', '.join(tools)} missing): run `.ci/slurm-cluster.sh install`"
        )
    if os.path.exists("/etc/slurm/slurm.conf") and not os.path.islink("/etc/slurm/slurm.conf"):
        return "a SLURM configuration already exists on this machine; not touching it"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    r = subprocess.run(
        ["bash", str(SCRIPT), "start", str(d)], env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(d)], env=env)
        pytest.fail(
            f"could not start SLURM: {r.stderr}\n"
            + "".join(
                (d / "log" / f).read_text(encoding="utf-8")[-2000:] for f in os.listdir(d / "log")
            )
        )
    yield env
    subprocess.run(["bash", str(SCRIPT), "stop", str(d)], env=env)


def test_tiny_workflow_runs_in_the_intended_partitions(cluster, tmp_path):
    cfg = yaml.safe_load((REPO / "tests/config/tiny.yaml").read_text(encoding="utf-8"))
    cfg["structure"] = str(OPEN_PDB)
    cfg["hemnma"]["ranks"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    # the project's profile, with memory and CPU requests shrunk to this 2-core node
    profile = yaml.safe_load(
        (REPO / "config/profiles/slurm/config.yaml").read_text(encoding="utf-8")
    )
    for res in profile["set-resources"].values():
        for key in ("mem_mb", "cpus_per_gpu"):
            if key in res:
                res[key] = {"mem_mb": 2000, "cpus_per_gpu": 1}[key]
        res.pop("mem_mb_per_cpu", None)
    profile["set-threads"] = {k: 1 for k in profile["set-threads"]}
    profile["slurm-init-seconds-before-status-checks"] = 1
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile/config.yaml").write_text(yaml.safe_dump(profile), encoding="utf-8")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "config.yaml"),
            "--profile",
            str(tmp_path / "profile"),
        ],
        env=cluster,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = {}
    for log in (tmp_path / "results/logs").rglob("*.log"):
        m = re.search(
            r"SLURM job (\d+): partition=(\S+) ntasks=(\S+)", log.read_text(encoding="utf-8")
        )
        assert m, f"{log.name}: no SLURM record (did the job run outside SLURM?)"
        seen[log.relative_to(tmp_path / "results/logs").as_posix()] = m.groups()
    print({k: v for k, v in sorted(seen.items())})
    gpu_logs = [k for k in seen if k.startswith(("train_", "infer_"))]
    assert len(gpu_logs) == 6
    for name, (_, partition, _) in seen.items():
        want = "gpu" if name in gpu_logs else "cpu"
        if not name.startswith(("hemnma/", "hybrid/")):  # MPI ranks: checked with scontrol
            assert partition == want, f"{name} ran in {partition}, expected {want}"
    shards = [f"{rule}/shard_{i}.log" for rule in ("hemnma", "hybrid") for i in (0, 1)]
    for shard in shards:
        text = (tmp_path / "results/logs" / shard).read_text(encoding="utf-8")
        assert "on 2 rank(s)" in text
        info = subprocess.run(
            ["scontrol", "show", "job", seen[shard][0]], env=cluster, capture_output=True, text=True
        ).stdout
        assert "Partition=cpu" in info and "NumTasks=2" in info, info
