# FerKD / FKD: the pipeline trains the teacher (the shared train rule, experiment `teacher`), labels the regions of
# every training image shard by shard (restartable, parallel), rewrites the labels FerKD's way, and trains the
# students on the stored regions (the shared train rule: the `fkd` method declares its label set as an input).
# The shared rules build the tables and accuracy curves; these rules add the label sets and the paper's figures.


include: "common.smk"


wildcard_constraints:
    shard=r"\d{5}",
    labelset="[A-Za-z0-9_.-]+",


rule ferkd_label_shard:
    # one shard of images labelled by the teacher (or imported from the published files); a shard whose file
    # exists is skipped, so an interrupted labelling resumes where it stopped
    input:
        ferkd_teacher_input,
    output:
        "results/ferkd/{scale}/labels/teacher/shard_{shard}.npz",
    params:
        # the shards are relabelled when the label config changes (digest), never for paths or launchers
        digest=ferkd_labelset_digest,
        verb=ferkd_shard_verb,
    threads: ferkd_shard_cpus
    resources:
        gpu=ferkd_shard_gpus,
        pack=PACK,
        mem_mb=ferkd_shard_mem_mb,
        runtime=ferkd_shard_runtime,
        cpus_per_task=ferkd_shard_cpus,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/ferkd/{scale}/labels/teacher/shard_{shard}.log",
    shell:
        # common.gpu_slots hands the job a GPU when it needs one (--need 0 runs it as it is)
        "OMP_NUM_THREADS={threads} python -m common.gpu_slots --need {resources.gpu} --pack {resources.pack} -- "
        "python -m papers.ferkd.regions {params.verb:q} --scale {wildcards.scale:q} "
        "--shard {wildcards.shard:q} "
        "> {log:q} 2>&1"


rule ferkd_label_manifest:
    input:
        ferkd_shard_files,
    output:
        "results/ferkd/{scale}/labels/teacher/manifest.json",
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/ferkd/{scale}/labels/teacher/manifest.log",
    shell:
        "python -m papers.ferkd.regions gather --scale {wildcards.scale:q} > {log:q} 2>&1"


rule ferkd_label_adapt:
    # FerKD's offline rewrite of the teacher labels (papers/ferkd/adapt.py); its per-group fractions go into the
    # manifest's stats and into every student run's log (method_stats)
    input:
        "results/ferkd/{scale}/labels/teacher/manifest.json",
    output:
        "results/ferkd/{scale}/labels/adapted/{labelset}/manifest.json",
    params:
        digest=ferkd_adapt_digest,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/ferkd/{scale}/labels/adapted/{labelset}.log",
    shell:
        "python -m papers.ferkd.regions adapt --scale {wildcards.scale:q} --name {wildcards.labelset:q} "
        "> {log:q} 2>&1"


rule ferkd_fig_regions:
    input:
        ferkd_regions_inputs,
    output:
        png=report(
            "figures/ferkd/{scale}/regions.png",
            caption="report/regions.rst",
            category="ferkd",
            subcategory="{scale}",
            labels={"paper": "ferkd", "figure": "regions by teacher score", "scale": "{scale}"},
        ),
        pdf="figures/ferkd/{scale}/regions.pdf",
    params:
        stamp=ferkd_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/ferkd/{scale}/regions.log",
    shell:
        "python -m papers.ferkd.figures regions --scale {wildcards.scale:q} "
        "--out figures/ferkd/{wildcards.scale:q}/regions --stamp {params.stamp:q} > {log:q} 2>&1"


rule ferkd_fig_groups:
    input:
        ferkd_groups_inputs,
    output:
        png=report(
            "figures/ferkd/{scale}/groups.png",
            caption="report/groups.rst",
            category="ferkd",
            subcategory="{scale}",
            labels={"paper": "ferkd", "figure": "per-group fractions", "scale": "{scale}"},
        ),
        pdf="figures/ferkd/{scale}/groups.pdf",
    params:
        stamp=ferkd_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/ferkd/{scale}/groups.log",
    shell:
        "python -m papers.ferkd.figures groups --scale {wildcards.scale:q} "
        "--out figures/ferkd/{wildcards.scale:q}/groups --stamp {params.stamp:q} > {log:q} 2>&1"


rule ferkd_fig_convergence:
    input:
        ferkd_convergence_inputs,
    output:
        png=report(
            "figures/ferkd/{scale}/convergence_{experiment}.png",
            caption="report/convergence.rst",
            category="ferkd",
            subcategory="{scale}",
            labels={"paper": "ferkd", "figure": "convergence {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/ferkd/{scale}/convergence_{experiment}.pdf",
    params:
        runs=ferkd_convergence_arg,
        stamp=ferkd_stamp,
    conda:
        "../../envs/repro.yaml"
    log:
        "logs/ferkd/{scale}/convergence_{experiment}.log",
    shell:
        "python -m papers.ferkd.figures convergence --runs {params.runs:q} "
        "--out figures/ferkd/{wildcards.scale:q}/convergence_{wildcards.experiment:q} "
        "--stamp {params.stamp:q} > {log:q} 2>&1"


rule reproduce_ferkd:
    input:
        paper_targets("ferkd"),
        [f"figures/ferkd/{SCALE}/{name}.png" for name in ("regions", "groups")],
        [f"figures/ferkd/{SCALE}/convergence_{experiment}.png" for experiment in ferkd_main_experiments()],
