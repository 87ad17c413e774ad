rule hybrid_select:
    input:
        merged=rules.merge.output.star,
    output:
        shards=expand(res("hybrid/shards/shard_{i}.star"), i=hybrid_shard_ids()),
    log:
        res("logs/hybrid_select.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        args=quoted(hybrid_select_args()),
    shell:
        "deephemnma hybrid select --merged {input.merged:q} {params.args} "
        "--out {output.shards:q} > {log:q} 2>&1"


rule hybrid_refine:
    input:
        shard=res("hybrid/shards/shard_{i}.star"),
        stacks=res("particles/stacks"),
        model=pass_references("model.npz", update_count()),
        modes=pass_references("modes.npz", update_count()),
    output:
        res("hybrid/refined/shard_{i}.star"),
    log:
        res("logs/hybrid/shard_{i}.log"),
    benchmark:
        res("benchmarks/hybrid/shard_{i}.tsv")
    conda:
        "../envs/deephemnma.yaml"
    threads: config["hemnma"]["ranks"]
    resources:
        tasks=config["hemnma"]["ranks"],
        mpi="mpiexec",
    params:
        args=quoted(hybrid_args()),
    shell:
        "{resources.mpi} -n {resources.tasks} deephemnma hemnma --particles {input.shard:q} "
        "--model {input.model:q} --modes {input.modes:q} {params.args} --out {output:q} "
        "> {log:q} 2>&1"


rule hybrid:
    input:
        merged=rules.merge.output.star,
        refined=expand(res("hybrid/refined/shard_{i}.star"), i=hybrid_shard_ids()),
        hemnma=res("hemnma/hemnma.star"),
    output:
        star=res("network/hybrid.star"),
        md=report(
            res("network/hybrid.md"),
            caption="../report/hybrid.rst",
            category="0. Verdicts",
        ),
    log:
        res("logs/hybrid.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        flag_z=config["hemnma"]["flag_z"],
        originals=len(structures()),
    shell:
        "deephemnma hybrid combine --merged {input.merged:q} --refined {input.refined:q} "
        "--hemnma {input.hemnma:q} --flag-z {params.flag_z} --originals {params.originals} "
        "--out {output.star:q} "
        "--out-md {output.md:q} > {log:q} 2>&1"
