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
        model=pass_references("model.npz", update_count()),
        modes=pass_references("modes.npz", update_count()),
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
        md=report(
            res("hemnma/verdict.md"),
            caption="../report/hemnma_verdict.rst",
            category="0. Verdicts",
        ),
    log:
        res("logs/gather.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        args=quoted(
            cli_flags(
                {"flag_z": config["hemnma"]["flag_z"], "originals": len(structures())}
            )
        ),
    shell:
        "deephemnma gather --shards {input:q} --out {output.star:q} "
        "--out-figure {output.figure:q} --out-md {output.md:q} {params.args} > {log:q} 2>&1"


# Reference update (hemnma.reference_update.iterations > 0): passes 0..N-1 in hemnma/pass_{p}/,
# each followed by a fit per group; the last pass is the rules above (hemnma/hemnma.star).


use rule hemnma as hemnma_pass with:
    input:
        shard=res("hemnma/shards/shard_{i}.star"),
        stacks=res("particles/stacks"),
        model=pass_input("model.npz"),
        modes=pass_input("modes.npz"),
    output:
        res("hemnma/pass_{p}/aligned/shard_{i}.star"),
    log:
        res("logs/hemnma/pass_{p}/shard_{i}.log"),
    benchmark:
        res("benchmarks/hemnma/pass_{p}/shard_{i}.tsv")


use rule gather as gather_pass with:
    input:
        pass_shards,
    output:
        star=res("hemnma/pass_{p}/hemnma.star"),
        figure=res("hemnma/pass_{p}/cost.png"),
        md=report(
            res("hemnma/pass_{p}/verdict.md"),
            caption="../report/hemnma_pass_verdict.rst",
            category="0. Verdicts",
        ),
    log:
        res("logs/gather_pass_{p}.log"),


rule fit:
    input:
        star=update_star,
        stacks=res("particles/stacks"),
        model=rules.prepare_model.output.npz,
        modes=rules.nma.output.npz,
        pdb=rules.prepare_model.output.pdb,
    output:
        model=res("model/update_{u}/reference_{g}/model.npz"),
        modes=res("model/update_{u}/reference_{g}/modes.npz"),
        pdb=res("model/update_{u}/reference_{g}/model.pdb"),
        json=res("model/update_{u}/reference_{g}/fit.json"),
        map=res("maps/update_{u}/group_{g}.mrc"),
    log:
        res("logs/fit/update_{u}_group_{g}.log"),
    benchmark:
        res("benchmarks/fit/update_{u}_group_{g}.tsv")
    conda:
        "../envs/deephemnma.yaml"
    threads: 2
    params:
        args=quoted(fit_args()),
    shell:
        "deephemnma fit --particles {input.star:q} --model {input.model:q} "
        "--modes {input.modes:q} --pdb {input.pdb:q} --group {wildcards.g} {params.args} "
        "--out-model {output.model:q} --out-modes {output.modes:q} --out-pdb {output.pdb:q} "
        "--out-json {output.json:q} --out-map {output.map:q} > {log:q} 2>&1"
