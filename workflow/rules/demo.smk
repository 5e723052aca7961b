# The embedded demo: seeded synthetic data, a locally trained tokenizer, a tiny random Qwen2 model.


rule build_demo_data:
    output:
        pool="results/demo/pool.json",
        eval="results/demo/eval.jsonl",
        control="results/demo/control.jsonl",
        pretrain="results/demo/pretrain.jsonl",
        traces="results/demo/traces.json",
        pairs="results/demo/pairs.jsonl",
    log:
        "logs/demo/build_demo_data.log",
    priority: 100
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        python=python_of("core"),
        seed=config["demo"]["seed"],
        sizes=as_json(config["demo"]["sizes"]),
    shell:
        "{params.python:q} -m reasonlab build-demo-data --log {log:q} --pool {output.pool:q}"
        " --eval {output.eval:q} --control {output.control:q} --pretrain {output.pretrain:q}"
        " --traces {output.traces:q} --pairs {output.pairs:q}"
        " --seed {params.seed} --sizes {params.sizes:q}"


rule build_demo_tokenizer:
    input:
        pool=rules.build_demo_data.output.pool,
        control=rules.build_demo_data.output.control,
        pretrain=rules.build_demo_data.output.pretrain,
    output:
        directory("results/demo/tokenizer"),
    log:
        "logs/demo/build_demo_tokenizer.log",
    priority: 100
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        python=python_of("core"),
        vocab_size=config["demo"]["vocab_size"],
    shell:
        "{params.python:q} -m reasonlab build-demo-tokenizer --log {log:q} --pool {input.pool:q}"
        " --control {input.control:q} --pretrain {input.pretrain:q} --output {output:q}"
        " --vocab-size {params.vocab_size}"


rule build_demo_model:
    input:
        tokenizer=rules.build_demo_tokenizer.output[0],
    output:
        directory("results/demo/model-init"),
    log:
        "logs/demo/build_demo_model.log",
    benchmark:
        "benchmarks/demo/build_demo_model.tsv"
    priority: 100
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        python=python_of("core"),
        spec=as_json(config["demo"]["model"]),
        seed=config["demo"]["seed"],
    shell:
        "{params.python:q} -m reasonlab build-demo-model --log {log:q} --tokenizer {input.tokenizer:q}"
        " --output {output:q} --spec {params.spec:q} --seed {params.seed}"
