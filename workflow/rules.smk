# Rules shared by every paper: train one run, build one table, draw curves and mixed examples.
# Paper-specific rules live in papers/<paper>/workflow.smk and are prefixed with the paper's name.


rule train:
    # Declared output is metrics.json, written last; the checkpoint/ beside it is not an output, so a
    # killed job keeps it and resumes when the workflow runs again.
    input:
        # files the run's method reads (Method.inputs, e.g. FKD's stored region labels): built first
        train_inputs,
    output:
        "results/{paper}/{scale}/{experiment}/{method}/seed{seed}/metrics.json",
    conda:
        "../envs/repro.yaml"
    log:
        "logs/train/{paper}/{scale}/{experiment}/{method}/seed{seed}.log",
    params:
        # the only param: Snakemake retrains a finished run when (and only when) its resolved config changes
        config_hash=train_config_hash,
    threads: train_cpus
    resources:
        gpu=train_gpus,
        gpu_share=train_gpu_share,
        pack=PACK,
        mem_mb=train_mem_mb,
        runtime=train_runtime,
        cpus_per_task=train_cpus,
    shell:
        # pin intra-op threads to the job's cores: oversubscribed small ops run many times slower
        "OMP_NUM_THREADS={threads} python -m common.workflow train --paper {wildcards.paper:q} "
        "--scale {wildcards.scale:q} --experiment {wildcards.experiment:q} --method {wildcards.method:q} "
        "--seed {wildcards.seed:q} --pack {resources.pack} > {log:q} 2>&1"


rule table:
    input:
        table_inputs,
    output:
        md="reports/{paper}/{scale}/{table}.md",
        csv=report(
            "reports/{paper}/{scale}/{table}.csv",
            caption="report/table.rst",
            category="{paper}",
            subcategory="{scale}",
            labels={"paper": "{paper}", "table": "{table}", "scale": "{scale}"},
        ),
        tex="reports/{paper}/{scale}/{table}.tex",
    conda:
        "../envs/repro.yaml"
    log:
        "logs/table/{paper}/{scale}/{table}.log",
    shell:
        "python -m common.report table --paper {wildcards.paper:q} --scale {wildcards.scale:q} "
        "--table {wildcards.table:q} > {log:q} 2>&1"


rule curves:
    input:
        curves_inputs,
    output:
        png=report(
            "figures/{paper}/{scale}/curves_{experiment}.png",
            caption="report/curves.rst",
            category="{paper}",
            subcategory="{scale}",
            labels={"paper": "{paper}", "figure": "curves {experiment}", "scale": "{scale}"},
        ),
        pdf="figures/{paper}/{scale}/curves_{experiment}.pdf",
    conda:
        "../envs/repro.yaml"
    log:
        "logs/curves/{paper}/{scale}/{experiment}.log",
    shell:
        "python -m common.report curves --paper {wildcards.paper:q} --scale {wildcards.scale:q} "
        "--experiment {wildcards.experiment:q} > {log:q} 2>&1"


rule mixed_examples:
    input:
        mixed_examples_inputs,
    output:
        png=report(
            "figures/{paper}/{scale}/mixed_examples.png",
            caption="report/mixed_examples.rst",
            category="{paper}",
            subcategory="{scale}",
            labels={"paper": "{paper}", "figure": "mixed examples", "scale": "{scale}"},
        ),
        pdf="figures/{paper}/{scale}/mixed_examples.pdf",
    conda:
        "../envs/repro.yaml"
    log:
        "logs/mixed_examples/{paper}/{scale}.log",
    shell:
        "python -m common.report examples --paper {wildcards.paper:q} --scale {wildcards.scale:q} "
        "> {log:q} 2>&1"


rule claims_forest:
    # one paper's claims at one scale: our gain with its 95% interval beside the paper's (common/claims.py)
    input:
        forest_inputs,
    output:
        png=report(
            "figures/{paper}/{scale}/claims_forest.png",
            caption="report/claims_forest.rst",
            category="{paper}",
            subcategory="{scale}",
            labels={"paper": "{paper}", "figure": "claims forest plot", "scale": "{scale}"},
        ),
        pdf="figures/{paper}/{scale}/claims_forest.pdf",
    conda:
        "../envs/repro.yaml"
    log:
        "logs/claims_forest/{paper}/{scale}.log",
    shell:
        "python -m common.report forest --paper {wildcards.paper:q} --scale {wildcards.scale:q} "
        "> {log:q} 2>&1"
