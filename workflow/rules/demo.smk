# The embedded demo: seeded synthetic data, a locally trained tokenizer, a tiny random Qwen2 model.


rule build_demo_data:
    output:
        pool="results/demo/pool.json",
        eval="results/demo/eval.jsonl",
        control="results/demo/control.jsonl",
        pretrain="results/demo/pretrain.jsonl",
    params:
        seed=config["demo"]["seed"],
        sizes=config["demo"]["sizes"],
    log:
        "logs/demo/build_demo_data.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/build_demo_data.py"


rule build_demo_tokenizer:
    input:
        pool=rules.build_demo_data.output.pool,
        control=rules.build_demo_data.output.control,
        pretrain=rules.build_demo_data.output.pretrain,
    output:
        directory("results/demo/tokenizer"),
    params:
        vocab_size=config["demo"]["vocab_size"],
    log:
        "logs/demo/build_demo_tokenizer.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../../scripts/build_demo_tokenizer.py"


rule build_demo_model:
    input:
        tokenizer=rules.build_demo_tokenizer.output[0],
    output:
        directory("results/demo/model-init"),
    params:
        spec=config["demo"]["model"],
        seed=config["demo"]["seed"],
    log:
        "logs/demo/build_demo_model.log",
    benchmark:
        "benchmarks/demo/build_demo_model.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../../scripts/build_demo_model.py"
