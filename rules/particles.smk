if config["particles"]["source"] == "simulate":

    rule simulate:
        input:
            model=rules.prepare_model.output.npz,
            modes=rules.nma.output.npz,
        output:
            star=res("particles/particles.star"),
            stacks=directory(res("particles/stacks")),
            montage=report(
                res("particles/montage.png"),
                caption="../report/montage.rst",
                category="2. Particles",
            ),
        log:
            res("logs/simulate.log"),
        benchmark:
            res("benchmarks/simulate.tsv")
        conda:
            "../envs/deephemnma.yaml"
        params:
            args=quoted(simulate_args()),
        shell:
            "deephemnma simulate --model {input.model:q} --modes {input.modes:q} {params.args} "
            "--out-star {output.star:q} --out-stacks {output.stacks:q} "
            "--out-montage {output.montage:q} > {log:q} 2>&1"

else:

    rule import_particles:
        input:
            star=config["particles"]["import"]["star"],
        output:
            star=res("particles/particles.star"),
            stacks=directory(res("particles/stacks")),
        log:
            res("logs/import_particles.log"),
        benchmark:
            res("benchmarks/import_particles.tsv")
        conda:
            "../envs/deephemnma.yaml"
        params:
            args=quoted(import_args()),
        shell:
            "deephemnma import --star {input.star:q} {params.args} "
            "--out-star {output.star:q} --out-stacks {output.stacks:q} > {log:q} 2>&1"
