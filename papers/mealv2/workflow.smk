# MEAL V2: the pipeline trains the teachers and the student's starting weights as ordinary runs (experiments
# `teacher` and `student_init`, method erm), then the distillation runs (the shared train rule: the `mealv2` and
# `mealv2_ce` methods declare those runs' metrics.json as inputs, so they train first). At paper scale the teachers
# and the start are local checkpoint files named in the config. The shared rules build the tables and curves.


rule reproduce_mealv2:
    input:
        paper_targets("mealv2"),
