# The embedded demo: seeded synthetic data, a locally trained tokenizer, a tiny random Qwen2 model.


rule build_demo_data:
    output:
        pool="results/demo/pool.json",
        eval="results/demo/eval.jsonl",
        control="results/demo/control.jsonl",
        pretrain="results/demo/pretrain.jsonl",
    log:
        "logs/demo/build_demo_data.log",
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        seed=config["demo"]["seed"],
        sizes=canonical(config["demo"]["sizes"]),
    script:
        "../../scripts/build_demo_data.py"


rule build_demo_tokenizer:
    input:
        pool=rules.build_demo_data.output.pool,
        control=rules.build_demo_data.output.control,
        pretrain=rules.build_demo_data.output.pretrain,
    output:
        directory("results/demo/tokenizer"),
    log:
        "logs/demo/build_demo_tokenizer.log",
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        vocab_size=config["demo"]["vocab_size"],
    script:
        "../../scripts/build_demo_tokenizer.py"


rule build_demo_model:
    input:
        tokenizer=rules.build_demo_tokenizer.output[0],
    output:
        directory("results/demo/model-init"),
    log:
        "logs/demo/build_demo_model.log",
    benchmark:
        "benchmarks/demo/build_demo_model.tsv"
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        spec=canonical(config["demo"]["model"]),
        seed=config["demo"]["seed"],
    script:
        "../../scripts/build_demo_model.py"
