rule prepare_model:
    input:
        structure=structures()[0],
    output:
        npz=res("model/model.npz"),
        pdb=res("model/model.pdb"),
    log:
        res("logs/prepare_model.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        atoms=config["model"]["atoms"],
        chains=quoted(config["model"]["chains"]),
        map_threshold=quoted(
            []
            if config["model"]["map_threshold"] is None
            else ["--map-threshold", config["model"]["map_threshold"]]
        ),
        pseudo_atoms=config["model"]["pseudo_atoms"],
    shell:
        "deephemnma prepare-model --structure {input.structure:q} --atoms {params.atoms:q} "
        "--chains {params.chains} {params.map_threshold} --pseudo-atoms {params.pseudo_atoms} "
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
        anim=expand(res("model/anim/mode{k}.pdb"), k=mode_numbers()),
    log:
        res("logs/nma.log"),
    benchmark:
        res("benchmarks/nma.tsv")
    conda:
        "../envs/deephemnma.yaml"
    params:
        n_modes=config["nma"]["n_modes"],
        cutoff=config["nma"]["cutoff"],
        gamma=config["nma"]["gamma"],
        coarse_above=config["nma"]["coarse_above"],
        amplitude=config["nma"]["animate_amplitude"],
        compare=quoted(compare_to_args()),
        anim_dir=anim_dir,
    shell:
        "deephemnma nma --model {input.npz:q} --pdb {input.pdb:q} --n-modes {params.n_modes} "
        "--cutoff {params.cutoff} --gamma {params.gamma} --coarse-above {params.coarse_above} "
        "--animate-amplitude {params.amplitude} {params.compare} "
        "--out-npz {output.npz:q} --out-nmd {output.nmd:q} --out-table {output.table:q} "
        "--out-anim-dir {params.anim_dir:q} > {log:q} 2>&1"


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
        anim=expand(res("model/reference_{{r}}/anim/mode{k}.pdb"), k=mode_numbers()),
    log:
        res("logs/nma_reference_{r}.log"),
    benchmark:
        res("benchmarks/nma_reference_{r}.tsv")
