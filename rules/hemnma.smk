rule shard:
    input:
        star=res("particles/particles.star"),
    output:
        shards=expand(res("hemnma/shards/shard_{i}.star"), i=shard_ids()),
    log:
        res("logs/shard.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        args=quoted(shard_args()),
    shell:
        "deephemnma shard --particles {input.star:q} {params.args} --out {output.shards:q} "
        "> {log:q} 2>&1"


rule hemnma:
    input:
        shard=res("hemnma/shards/shard_{i}.star"),
        stacks=res("particles/stacks"),
        model=reference_files("model.npz"),
        modes=reference_files("modes.npz"),
    output:
        res("hemnma/aligned/shard_{i}.star"),
    log:
        res("logs/hemnma/shard_{i}.log"),
    benchmark:
        res("benchmarks/hemnma/shard_{i}.tsv")
    conda:
        "../envs/deephemnma.yaml"
    threads: config["hemnma"]["ranks"]
    resources:
        tasks=config["hemnma"]["ranks"],
        mpi="mpiexec",
    params:
        args=quoted(hemnma_args()),
    shell:
        "{resources.mpi} -n {resources.tasks} deephemnma hemnma --particles {input.shard:q} "
        "--model {input.model:q} --modes {input.modes:q} {params.args} --out {output:q} "
        "> {log:q} 2>&1"


rule gather:
    input:
        expand(res("hemnma/aligned/shard_{i}.star"), i=shard_ids()),
    output:
        star=res("hemnma/hemnma.star"),
        figure=report(
            res("hemnma/cost.png"),
            caption="../report/hemnma_cost.rst",
            category="3. HEMNMA",
        ),
    log:
        res("logs/gather.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        flag_z=config["hemnma"]["flag_z"],
    shell:
        "deephemnma gather --shards {input:q} --out {output.star:q} "
        "--out-figure {output.figure:q} --flag-z {params.flag_z} > {log:q} 2>&1"
