from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/envs.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/datasets.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/traces.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/interventions.smk"
include: "workflow/rules/guided.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/report.smk"


onstart:
    check_cluster_tools()


rule all:
    input:
        PLAN.final_outputs(),
    localrule: True
