from reasonlab.demo import TinyModelSpec, build_tiny_model
from reasonlab.logs import job_log

with job_log(snakemake.log[0], "build_demo_model") as log:
    spec = TinyModelSpec(**snakemake.params.spec)
    n = build_tiny_model(
        snakemake.input.tokenizer, snakemake.output[0], spec, snakemake.params.seed
    )
    log.info("initialised a Qwen2 model with %d parameters (%s)", n, spec)
