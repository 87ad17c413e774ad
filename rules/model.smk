if is_map(structures()[0]):

    rule pseudo_atoms:
        input:
            map=structures()[0],
        output:
            pdb=res("model/pseudo_atoms.pdb"),
            map=res("model/pseudo_atoms.mrc"),
            table=report(
                res("model/pseudo_atoms.csv"),
                caption="../report/pseudo_atoms.rst",
                category="1. Model and normal modes",
            ),
            json=res("model/pseudo_atoms.json"),
            figure=report(
                res("model/pseudo_atoms.png"),
                caption="../report/pseudo_atoms.rst",
                category="1. Model and normal modes",
            ),
        log:
            res("logs/pseudo_atoms.log"),
        benchmark:
            res("benchmarks/pseudo_atoms.tsv")
        conda:
            "../envs/deephemnma.yaml"
        params:
            args=quoted(pseudo_atom_args()),
        shell:
            "deephemnma pseudo-atoms --map {input.map:q} {params.args} --out-pdb {output.pdb:q} "
            "--out-map {output.map:q} --out-table {output.table:q} --out-json {output.json:q} "
            "--out-figure {output.figure:q} > {log:q} 2>&1"


rule prepare_model:
    input:
        structure=model_structure(),
    output:
        npz=res("model/model.npz"),
        pdb=res("model/model.pdb"),
    log:
        res("logs/prepare_model.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        args=quoted(prepare_model_args()),
    shell:
        "deephemnma prepare-model --structure {input.structure:q} {params.args} "
        "--out-npz {output.npz:q} --out-pdb {output.pdb:q} > {log:q} 2>&1"


rule nma:
    input:
        npz=rules.prepare_model.output.npz,
        pdb=rules.prepare_model.output.pdb,
        compare_to=config["nma"]["compare_to"] or [],
    output:
        npz=res("model/modes.npz"),
        nmd=res("model/modes.nmd"),
        table=report(
            res("model/modes.csv"),
            caption="../report/modes.rst",
            category="1. Model and normal modes",
        ),
        anim=directory(res("model/anim")),
    log:
        res("logs/nma.log"),
    benchmark:
        res("benchmarks/nma.tsv")
    conda:
        "../envs/deephemnma.yaml"
    params:
        args=quoted(nma_args()),
    shell:
        "deephemnma nma --model {input.npz:q} --pdb {input.pdb:q} {params.args} "
        "--out-npz {output.npz:q} --out-nmd {output.nmd:q} --out-table {output.table:q} "
        "--out-anim-dir {output.anim:q} > {log:q} 2>&1"


use rule prepare_model as prepare_reference with:
    input:
        structure=reference_structure,
    output:
        npz=res("model/reference_{r}/model.npz"),
        pdb=res("model/reference_{r}/model.pdb"),
    log:
        res("logs/prepare_reference_{r}.log"),


use rule nma as nma_reference with:
    input:
        npz=rules.prepare_reference.output.npz,
        pdb=rules.prepare_reference.output.pdb,
        compare_to=config["nma"]["compare_to"] or [],
    output:
        npz=res("model/reference_{r}/modes.npz"),
        nmd=res("model/reference_{r}/modes.nmd"),
        table=res("model/reference_{r}/modes.csv"),
        anim=directory(res("model/reference_{r}/anim")),
    log:
        res("logs/nma_reference_{r}.log"),
    benchmark:
        res("benchmarks/nma_reference_{r}.tsv")
