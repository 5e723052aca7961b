# Runs inside the environment it describes (see workflow/rules/envs.smk), so it takes arguments
# instead of Snakemake's `snakemake` object.
import argparse
import json
from pathlib import Path

from reasonlab.envinfo import describe

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--env", required=True)
parser.add_argument("--output", required=True)
args = parser.parse_args()

info = describe(args.env)
print(json.dumps(info, indent=2))
Path(args.output).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
if not info["ok"]:
    raise SystemExit(f"environment {args.env}: a module failed to import: {info['imports']}")
