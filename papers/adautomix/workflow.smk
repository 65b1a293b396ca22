# adautomix: the shared rules (train, table, curves, mixed_examples) build everything this paper needs: the
# AdAutoMix arms (experiment cifar100_r18[_800ep]), the baselines with the trainer's EMA (cifar100_r18_ema[_800ep])
# and as the paper ran them (cifar100_r18_plain[_800ep]), and the tables of paper_results.yaml.


rule reproduce_adautomix:
    input:
        paper_targets("adautomix"),
