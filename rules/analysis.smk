rule space:
    input:
        particles=space_input(),
        modes=rules.nma.output.npz,
        pdb=rules.prepare_model.output.pdb,
    output:
        pca=res("space/pca.npz"),
        table=res("space/space.csv"),
        groups_csv=res("space/groups.csv"),
        scatter=report(
            res("space/pca.png"),
            caption="../report/pca.rst",
            category="6. Conformational space",
        ),
        scatter3d=report(
            res("space/pca3d.png"),
            caption="../report/pca3d.rst",
            category="6. Conformational space",
        ),
        groups=expand(res("space/group_{g}.star"), g=group_ids()),
        centroids=expand(res("space/group_{g}_centroid.pdb"), g=group_ids()),
        trajectories=expand(res("space/trajectory_pc{a}.pdb"), a=[1, 2]),
        free_energy=report(
            res("space/free_energy.png"),
            caption="../report/free_energy.rst",
            category="6. Conformational space",
        ),
        free_energy_table=res("space/free_energy.csv"),
        path=path_outputs(),
    log:
        res("logs/space.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        args=quoted(space_args()),
        out_dir=output_dir,
    shell:
        "deephemnma space --particles {input.particles:q} --modes {input.modes:q} "
        "--pdb {input.pdb:q} {params.args} --out-dir {params.out_dir:q} > {log:q} 2>&1"


rule export:
    input:
        group=res("space/group_{g}.star"),
        original=config["particles"]["import"]["star"] or [],
    output:
        res("export/group_{g}.star"),
    log:
        res("logs/export_{g}.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        datadir=quoted(
            []
            if config["particles"]["import"]["datadir"] is None
            else ["--datadir", config["particles"]["import"]["datadir"]]
        ),
    shell:
        "deephemnma export --group {input.group:q} --original {input.original:q} "
        "{params.datadir} --out {output:q} > {log:q} 2>&1"


rule reconstruct:
    input:
        star=reconstruct_star,
        stacks=res("particles/stacks"),
    output:
        half1=res("maps/group_{g}_half1.mrc"),
        half2=res("maps/group_{g}_half2.mrc"),
        map=res("maps/group_{g}.mrc"),
    log:
        res("logs/reconstruct_{g}.log"),
    benchmark:
        res("benchmarks/reconstruct_{g}.tsv")
    conda:
        "../envs/deephemnma.yaml"
    threads: 2
    params:
        args=quoted(reconstruct_args()),
        roots=quoted(stack_roots()),
    shell:
        "deephemnma reconstruct --particles {input.star:q} {params.args} "
        "--roots {params.roots} --out-half1 {output.half1:q} --out-half2 {output.half2:q} "
        "--out-map {output.map:q} > {log:q} 2>&1"


rule fsc:
    input:
        half1=rules.reconstruct.output.half1,
        half2=rules.reconstruct.output.half2,
        map=rules.reconstruct.output.map,
        centroid=res("space/group_{g}_centroid.pdb"),
        model=rules.prepare_model.output.npz,
    output:
        model_map=res("maps/group_{g}_centroid_model.mrc"),
        csv=res("fsc/group_{g}.csv"),
        json=res("fsc/group_{g}.json"),
        figure=report(
            res("fsc/group_{g}.png"),
            caption="../report/fsc.rst",
            category="7. Reconstructions",
            subcategory="group {g}",
        ),
    log:
        res("logs/fsc_{g}.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        sigma=sigma_angstrom(),
    shell:
        "deephemnma fsc --half1 {input.half1:q} --half2 {input.half2:q} --map {input.map:q} "
        "--centroid-pdb {input.centroid:q} --model {input.model:q} --sigma-angstrom {params.sigma} "
        "--name 'group {wildcards.g}' --out-model-map {output.model_map:q} --out-csv {output.csv:q} "
        "--out-json {output.json:q} --out-figure {output.figure:q} > {log:q} 2>&1"
