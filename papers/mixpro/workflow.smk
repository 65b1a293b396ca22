# MixPro: the shared rules build its tables, accuracy curves and mixed examples; this rule adds the paper's own
# figure (MaskMix cells, attention and PAL weights on a few images, and the progressive factor per epoch).


include: "common.smk"


rule mixpro_fig_pal:
    input:
        mixpro_pal_inputs,
    output:
        png=report(
            "figures/mixpro/{scale}/pal_{experiment}.png",
            caption="report/pal.rst",
            category="mixpro",
            subcategory="{scale}",
            labels={"paper": "mixpro", "figure": "PAL {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/mixpro/{scale}/pal_{experiment}.pdf",
    params:
        runs=mixpro_pal_runs,
        stamp=mixpro_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/mixpro/{scale}/pal_{experiment}.log",
    shell:
        "python -m papers.mixpro.figures pal --runs {params.runs:q} "
        "--out figures/mixpro/{wildcards.scale:q}/pal_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule reproduce_mixpro:
    input:
        paper_targets("mixpro"),
        [f"figures/mixpro/{SCALE}/pal_{experiment}.png" for experiment in mixpro_experiments()],
