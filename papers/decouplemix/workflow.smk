# DecoupleMix: the shared rules (train, table, curves, mixed_examples) build everything this paper needs: one
# table per base mixing method (DM's gain over it), accuracy curves per experiment, and mixed examples.


rule reproduce_decouplemix:
    input:
        paper_targets("decouplemix"),
