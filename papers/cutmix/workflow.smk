# cutmix: the shared rules (train, table, curves, mixed_examples) build everything this paper needs.


rule reproduce_cutmix:
    input:
        paper_targets("cutmix"),
