# SMMix: the shared rules build its tables, accuracy curves and mixed examples; this rule adds the windows a
# trained model's motivating pass selects.


include: "common.smk"


rule smmix_fig_windows:
    input:
        smmix_windows_input,
    output:
        png=report(
            "figures/smmix/{scale}/windows_{experiment}.png",
            caption="report/windows.rst",
            category="smmix",
            subcategory="{scale}",
            labels={"paper": "smmix", "figure": "windows {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/smmix/{scale}/windows_{experiment}.pdf",
    params:
        run=smmix_windows_run,
        stamp=smmix_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/smmix/{scale}/windows_{experiment}.log",
    shell:
        "python -m papers.smmix.figures windows --run {params.run:q} "
        "--out figures/smmix/{wildcards.scale:q}/windows_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule reproduce_smmix:
    input:
        paper_targets("smmix"),
        [f"figures/smmix/{SCALE}/windows_{experiment}.png" for experiment in smmix_experiments()],
