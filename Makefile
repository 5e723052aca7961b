# The README's two commands:
#   make demo   build the environments, then run the embedded demo to results/report.html (and
#               results/figures/: every chart as SVG and PNG)
#   make test   build the environments, then run the test suite
# Building the environments (envs/setup.sh) is idempotent: an unchanged environment is skipped.
# The demo's jobs run as forks of a job server that imports torch once (reasonlab.jobserver).
VENVS ?= .venvs
CORES ?= 2

.PHONY: envs demo test

envs:
	bash envs/setup.sh

demo: envs
	$(VENVS)/core/bin/python -m reasonlab.jobserver -- $(VENVS)/core/bin/snakemake -c$(CORES)

test: envs
	$(VENVS)/core/bin/python -m pytest
