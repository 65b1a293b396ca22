# TransMix: the shared rules build its tables and accuracy curves; these rules add the paper's own figures.


include: "common.smk"


rule transmix_fig_attention:
    input:
        transmix_attention_input,
    output:
        png=report(
            "figures/transmix/{scale}/attention_{experiment}.png",
            caption="report/attention.rst",
            category="transmix",
            subcategory="{scale}",
            labels={"paper": "transmix", "figure": "attention {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/transmix/{scale}/attention_{experiment}.pdf",
    params:
        run=transmix_attention_run,
        stamp=transmix_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/transmix/{scale}/attention_{experiment}.log",
    shell:
        "python -m papers.transmix.figures attention --run {params.run:q} "
        "--out figures/transmix/{wildcards.scale:q}/attention_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule transmix_fig_weights:
    input:
        transmix_weights_inputs,
    output:
        png=report(
            "figures/transmix/{scale}/weights_{experiment}.png",
            caption="report/weights.rst",
            category="transmix",
            subcategory="{scale}",
            labels={"paper": "transmix", "figure": "weight shift {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/transmix/{scale}/weights_{experiment}.pdf",
    params:
        runs=transmix_weights_runs,
        stamp=transmix_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/transmix/{scale}/weights_{experiment}.log",
    shell:
        "python -m papers.transmix.figures weights --runs {params.runs:q} "
        "--out figures/transmix/{wildcards.scale:q}/weights_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule reproduce_transmix:
    input:
        paper_targets("transmix"),
        [f"figures/transmix/{SCALE}/{kind}_{experiment}.png"
         for kind in ("attention", "weights") for experiment in transmix_experiments()],
