# Tool environments. A rule that needs LlamaFactory or vLLM runs `python -m reasonlab <step>` with
# that environment's Python, as describe_env does here for every environment.


rule describe_env:
    input:
        stamp=get_env_stamp,
    output:
        "results/envs/{env}.json",
    log:
        "logs/describe_env/{env}.log",
    conda:
        get_env_conda
    threads: 1
    resources:
        mem_mb=4000,
        runtime=10,
    params:
        python=get_env_python,
    shell:
        "{params.python:q} -m reasonlab describe-env --log {log:q} --env {wildcards.env}"
        " --output {output:q}"
