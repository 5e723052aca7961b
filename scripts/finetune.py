# Runs inside the train environment (see workflow/rules/training.smk), so it takes arguments
# instead of Snakemake's `snakemake` object.
import argparse
import json

from reasonlab import ReasonlabError
from reasonlab.models import read_handle
from reasonlab.training import run_llamafactory, train_config

p = argparse.ArgumentParser(description="Train one run with llamafactory-cli.")
p.add_argument("--base", required=True, help="the base model's handle")
p.add_argument("--data-dir", required=True)
p.add_argument("--template", required=True)
p.add_argument("--output-dir", required=True)
p.add_argument("--yaml", required=True)
p.add_argument("--settings", required=True, help="the run's LlamaFactory settings (JSON)")
p.add_argument("--threads", type=int, default=2)
args = p.parse_args()

try:
    import torch

    torch.set_num_threads(args.threads)
    base = read_handle(args.base)
    if base.is_adapter:
        raise ReasonlabError(
            f"training from a LoRA adapter ({base.model}/{base.ckpt}) is not supported; merge it first"
        )
    cfg = train_config(json.loads(args.settings), base.location, args.data_dir, args.output_dir,
                       revision=base.commit, template=args.template)  # fmt: skip
    run_llamafactory(cfg, args.yaml)
except ReasonlabError as e:
    print(f"ERROR: {e}", flush=True)
    raise SystemExit(f"[finetune] error: {e}") from None
