# Runs inside the gen environment (see workflow/rules/generate.smk), so it takes arguments instead
# of Snakemake's `snakemake` object. vLLM starts worker processes: keep the __main__ guard.
import argparse
import json


def main():
    from reasonlab import ReasonlabError
    from reasonlab.generate import GenOptions, generate_dataset

    p = argparse.ArgumentParser(description="Generate completions for a prepared dataset.")
    p.add_argument("--handle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--options", required=True, help="generation options (JSON)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        import torch

        torch.set_num_threads(args.threads)
        generate_dataset(
            args.handle, args.data, args.output, GenOptions(**json.loads(args.options))
        )
    except ReasonlabError as e:
        print(f"ERROR: {e}", flush=True)
        raise SystemExit(f"[generate] error: {e}") from None


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
