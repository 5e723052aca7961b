"""Importing this module registers every report section (each lives beside the stage it reports on)."""

from reasonlab import generation_summary, overview, score_summary, training  # noqa: F401
