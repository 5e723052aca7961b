"""`python -m reasonlab <step> ...`: the `reasonlab` command (see `reasonlab.cli`).

The guard matters: vLLM starts worker processes that import the main module again.
"""

if __name__ == "__main__":
    import sys

    from reasonlab.cli import main

    main(sys.argv[1:])
