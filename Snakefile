# DeepHEMNMA: PDB -> normal modes -> particles -> HEMNMA -> networks -> conformational space.
import os
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

from deephemnma.config import check_config

min_version("9.0")


configfile: f"{workflow.basedir}/config/config.yaml"


check_config(
    config, f"{workflow.basedir}/config/schema.yaml"
)  # one line naming the key
validate(config, "config/schema.yaml")  # fills in the schema's defaults


envvars:
    "PATH",


# Jobs call the `deephemnma` CLI installed beside the Python that runs Snakemake.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


report: "report/workflow.rst"


wildcard_constraints:
    param="amplitudes|angles|shifts",
    i=r"\d+",
    g=r"\d+",
    r=r"\d+",
    p=r"\d+",
    u=r"\d+",


include: "rules/common.smk"
include: "rules/model.smk"
include: "rules/particles.smk"
include: "rules/hemnma.smk"
include: "rules/network.smk"
include: "rules/hybrid.smk"
include: "rules/analysis.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
