from reasonlab.demo import build_tokenizer
from reasonlab.logs import job_log
from reasonlab.synth import corpus_texts, read_demo_files

with job_log(snakemake.log[0], "build_demo_tokenizer") as log:
    data = read_demo_files(dict(snakemake.input.items()))
    size = build_tokenizer(corpus_texts(data), snakemake.output[0], snakemake.params.vocab_size)
    log.info("trained a byte-level BPE tokenizer with %d tokens", size)
