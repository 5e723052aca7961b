"""`python -m reasonlab <step> ...`: the `reasonlab` command (see `reasonlab.cli`).

When a job server runs (`python -m reasonlab.jobserver -- snakemake ...`, see
`reasonlab.jobserver`), the step runs in a fork of it, which has torch and transformers imported
already; otherwise, or when it cannot, here.

The guard matters: vLLM starts worker processes that import the main module again.
"""

if __name__ == "__main__":
    import sys

    from reasonlab.jobserver import exit_with, run_via_server

    code = run_via_server(sys.argv[1:])
    if code is not None:
        exit_with(code)

    from reasonlab.cli import main

    main(sys.argv[1:])
