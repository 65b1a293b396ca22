# ResizeMix: the shared rules build its tables, accuracy curves and mixed examples; these rules add the same
# (target, partner) pairs mixed by every method, and the label-weight law each method trains with.


include: "common.smk"


rule resizemix_fig_pairs:
    input:
        resizemix_config,
    output:
        png=report(
            "figures/resizemix/{scale}/pairs_{experiment}.png",
            caption="report/pairs.rst",
            category="resizemix",
            subcategory="{scale}",
            labels={"paper": "resizemix", "figure": "pairs {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/resizemix/{scale}/pairs_{experiment}.pdf",
    params:
        stamp=resizemix_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/resizemix/{scale}/pairs_{experiment}.log",
    shell:
        "python -m papers.resizemix.figures pairs --scale {wildcards.scale:q} "
        "--experiment {wildcards.experiment:q} "
        "--out figures/resizemix/{wildcards.scale:q}/pairs_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule resizemix_fig_weights:
    input:
        resizemix_config,
    output:
        png=report(
            "figures/resizemix/{scale}/weights_{experiment}.png",
            caption="report/weights.rst",
            category="resizemix",
            subcategory="{scale}",
            labels={"paper": "resizemix", "figure": "label weights {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/resizemix/{scale}/weights_{experiment}.pdf",
    params:
        stamp=resizemix_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/resizemix/{scale}/weights_{experiment}.log",
    shell:
        "python -m papers.resizemix.figures weights --scale {wildcards.scale:q} "
        "--experiment {wildcards.experiment:q} "
        "--out figures/resizemix/{wildcards.scale:q}/weights_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule reproduce_resizemix:
    input:
        paper_targets("resizemix"),
        resizemix_figure_targets(),
