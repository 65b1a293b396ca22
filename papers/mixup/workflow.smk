# mixup: the shared rules (train, table, curves, mixed_examples) build everything this paper needs.


rule reproduce_mixup:
    input:
        paper_targets("mixup"),
