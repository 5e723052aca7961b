"""reasonlab: study how language-model reasoning changes across models and training checkpoints.

The library behind the Snakemake workflow. Every module is importable from a notebook; none imports
Snakemake, and heavy dependencies (torch, transformers) are imported inside the functions that need
them so that the workflow's parse time stays cheap.
"""

__version__ = "0.1.0"


class ReasonlabError(Exception):
    """An error in the user's input that has one clear message: what was wrong, where, and what to do."""
