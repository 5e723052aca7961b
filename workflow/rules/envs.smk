# Tool environments. A rule that needs LlamaFactory or vLLM runs its script with that environment's
# Python (`params.python`), as describe_env does here for every environment.


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
        script=SCRIPTS / "describe_env.py",
    shell:
        "{params.python:q} {params.script:q} --env {wildcards.env} --output {output:q} > {log:q} 2>&1"
