rule split:
    input:
        labels=label_star(),
    output:
        res("network/split.csv"),
    log:
        res("logs/split.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        args=quoted(split_args()),
    shell:
        "deephemnma split --labels {input.labels:q} {params.args} --out {output:q} > {log:q} 2>&1"


rule synthesize:
    input:
        model=res("model/model.npz"),
        modes=res("model/modes.npz"),
        particles=res("particles/particles.star"),
        stacks=res("particles/stacks"),
        labels=label_star(),
    output:
        images=res("network/synthetic/images.npy"),
        labels=res("network/synthetic/labels.npz"),
        meta=res("network/synthetic/meta.json"),
        figure=report(
            res("network/synthetic.png"),
            caption="../report/synthetic.rst",
            category="4. Networks",
        ),
    log:
        res("logs/synthesize.log"),
    benchmark:
        res("benchmarks/synthesize.tsv")
    conda:
        "../envs/deephemnma.yaml"
    threads: 2
    params:
        args=quoted(synthesize_args()),
        out_dir=output_dir,
    shell:
        "deephemnma synthesize --model {input.model:q} --modes {input.modes:q} "
        "--particles {input.particles:q} --labels {input.labels:q} {params.args} "
        "--out-dir {params.out_dir:q} --out-figure {output.figure:q} > {log:q} 2>&1"


rule train:
    input:
        labels=label_star(),
        split=rules.split.output[0],
        stacks=res("particles/stacks"),
        synthetic=synthetic_input(),
        model=res("model/model.npz"),
        modes=res("model/modes.npz"),
    output:
        network=res("network/{param}/network.pt"),
        history=res("network/{param}/history.csv"),
        loss=report(
            res("network/{param}/loss.png"),
            caption="../report/loss.rst",
            category="4. Networks",
            subcategory="{param}",
        ),
    log:
        res("logs/train_{param}.log"),
    benchmark:
        res("benchmarks/train_{param}.tsv")
    conda:
        "../envs/deephemnma.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        args=quoted(train_args()),
        pretrain=quoted(
            ["--pretrain", res("network/synthetic")] if pretraining() else []
        ),
        views=views_train_args,
        out_dir=output_dir,
    shell:
        "deephemnma train --param {wildcards.param} --labels {input.labels:q} "
        "--split {input.split:q} {params.args} {params.pretrain} {params.views} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"


rule infer:
    input:
        network=rules.train.output.network,
        particles=res("particles/particles.star"),
        stacks=res("particles/stacks"),
        poses=pose_inputs,
        model=res("model/model.npz"),
        modes=res("model/modes.npz"),
    output:
        res("network/{param}/inferred.star"),
    log:
        res("logs/infer_{param}.log"),
    benchmark:
        res("benchmarks/infer_{param}.tsv")
    conda:
        "../envs/deephemnma.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        args=quoted(infer_args()),
        candidates=candidate_args,
        views=lambda wildcards, input: quoted(
            ["--poses", *input.poses, "--model", input.model, "--modes", input.modes]
            + ["--sigma-angstrom", sigma_angstrom()]
            if input.poses
            else []
        ),
    shell:
        "deephemnma infer --network {input.network:q} --particles {input.particles:q} "
        "{params.views} {params.args} {params.candidates} --out {output:q} "
        "> {log:q} 2>&1"


rule quality:
    input:
        labels=label_star(),
        split=rules.split.output[0],
        inferred=expand(res("network/{param}/inferred.star"), param=network_params()),
    output:
        json=res("network/quality.json"),
        md=report(
            res("network/quality.md"),
            caption="../report/quality.rst",
            category="0. Verdicts",
        ),
        figure=report(
            res("network/calibration.png"),
            caption="../report/calibration.rst",
            category="0. Verdicts",
        ),
    log:
        res("logs/quality.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        args=quoted(quality_args()),
    shell:
        "deephemnma quality --labels {input.labels:q} --split {input.split:q} "
        "--inferred {input.inferred:q} {params.args} "
        "--out-json {output.json:q} --out-md {output.md:q} "
        "--out-figure {output.figure:q} > {log:q} 2>&1"


rule merge:
    input:
        particles=res("particles/particles.star"),
        inferred=expand(res("network/{param}/inferred.star"), param=network_params()),
        labelled=res("hemnma/hemnma.star"),
        quality=rules.quality.output.json,
        split=rules.split.output[0],
    output:
        star=res("network/deephemnma.star"),
        md=report(
            res("network/trust.md"),
            caption="../report/trust.rst",
            category="0. Verdicts",
        ),
    log:
        res("logs/merge.log"),
    conda:
        "../envs/deephemnma.yaml"
    params:
        flag_z=config["hemnma"]["flag_z"],
    shell:
        "deephemnma merge --particles {input.particles:q} --inferred {input.inferred:q} "
        "--labelled {input.labelled:q} --quality {input.quality:q} --split {input.split:q} "
        "--flag-z {params.flag_z} "
        "--out {output.star:q} --out-md {output.md:q} > {log:q} 2>&1"


rule evaluate:
    input:
        truth=res("particles/particles.star"),
        inferred=expand(res("network/{param}/inferred.star"), param=network_params()),
        final=space_input(),
        hemnma=res("hemnma/hemnma.star"),
        split=rules.split.output[0],
    output:
        csv=res("evaluate/accuracy.csv"),
        md=report(
            res("evaluate/accuracy.md"),
            caption="../report/accuracy.rst",
            category="5. Evaluation",
        ),
        figure=report(
            res("evaluate/overlap.png"),
            caption="../report/overlap.rst",
            category="5. Evaluation",
        ),
    log:
        res("logs/evaluate.log"),
    conda:
        "../envs/deephemnma.yaml"
    shell:
        "deephemnma evaluate --truth {input.truth:q} --inferred {input.inferred:q} "
        "--final {input.final:q} "
        "--hemnma {input.hemnma:q} --split {input.split:q} --out-csv {output.csv:q} "
        "--out-md {output.md:q} --out-figure {output.figure:q} > {log:q} 2>&1"
