from reasonlab.logs import job_log
from reasonlab.models import read_handle, resolve, write_handle

with job_log(snakemake.log[0], "resolve_model") as log:
    w = snakemake.wildcards
    base = read_handle(snakemake.input.base) if hasattr(snakemake.input, "base") else None
    handle = resolve(w.model, w.ckpt, snakemake.params.spec, base=base)
    write_handle(handle, snakemake.output.handle)
    log.info("%s/%s -> %s (%s)", w.model, w.ckpt, handle.location, handle.content_hash)
