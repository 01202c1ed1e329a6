# TVT pipeline. Stages, commands, inputs, outputs and parameters come from the stage
# registry in tvt/stages.py (the same one that generates dvc.yaml); the rules below only
# turn it into Snakemake rules. Locally: `snakemake --cores 2 all`;
# SLURM: `snakemake --profile profiles/slurm all`; paper mode: add `--configfile config/paper.yaml`;
# one value changed: `--config 'isr={tvt: {lr: 1e-4}}'` (merged into the section, validated).
from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/stages.smk"


# `snakemake --report report.html`: the results in one HTML file (workflow/rules/report.smk)
report: "workflow/report/workflow.rst"


rule all:
    default_target: True
    input:
        [path for stage in STAGES.values() for path in stage.products],
