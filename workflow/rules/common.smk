# Snakemake glue shared by every stage: config validation, the plan, wildcard constraints, where
# each tool environment's Python is. What the jobs are and what each receives is decided by
# reasonlab.plan (tested Python); the input functions below only hand its answers to Snakemake.
# Parse time stays cheap: nothing here imports torch or reads a model.
import shlex
import shutil
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from reasonlab.compute import local_gpus, rule_gpus  # noqa: E402
from reasonlab.config import ConfigError, config_hash, validate  # noqa: E402
from reasonlab.data import missing_sources  # noqa: E402
from reasonlab.plan import (  # noqa: E402
    COMPUTE_STAGES,
    ENVIRONMENTS,
    WILDCARDS,
    Plan,
    as_json,
    results_config,
    table_paths,
)
from reasonlab.report import generate as report_generate  # noqa: E402
from reasonlab.report import guided as report_guided  # noqa: E402
from reasonlab.report import interventions as report_interventions  # noqa: E402
from reasonlab.report import traces as report_traces  # noqa: E402
from reasonlab.report import overview as report_overview  # noqa: E402
from reasonlab.report import training as report_training  # noqa: E402

try:
    _validated = validate(config, workflow.source_path("../schemas/config.schema.yaml"))
except ConfigError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_validated)
_missing = missing_sources(config["datasets"])
if _missing:
    raise WorkflowError("\n".join(_missing))

# GPUs each model-loading rule's jobs get: its `gpu` resource (slurm/config.yaml set-resources,
# --set-resources), else, in a local run, this machine's. It decides what `auto` dtype means.
GPUS = rule_gpus(
    list(COMPUTE_STAGES),
    workflow.resource_settings.overwrite_resources,
    workflow.resource_settings.default_resources,
    local_gpus(),
)
PLAN = Plan(config, GPUS)
CONFIG_HASH = config_hash(results_config(config))
# options that change only speed reach the jobs through speed_only(): changing them re-runs nothing
GEN_OPTIONS, GEN_SPEED = PLAN.gen_options()
SCORE_OPTIONS, SCORE_SPEED = PLAN.score_options()
CAPTURE_OPTIONS, CAPTURE_SPEED = PLAN.capture_options()
DIRECTION_OPTIONS, DIRECTION_SPEED = PLAN.direction_options()
# the defaults of every training run (a shipped resource, so found beside the Snakefile)
LLAMAFACTORY_TEMPLATE = str(
    Path(workflow.basedir) / "resources" / "llamafactory" / "train.yaml"
)


wildcard_constraints:
    **WILDCARDS,


# ---------------------------------------------------------------- cluster


def check_cluster_tools():
    """Before any job is submitted with the SLURM executor (`--profile slurm`): SLURM's client
    commands must be on PATH, or every submission would fail with a bare "No such file".
    """
    plugin = workflow.executor_plugin
    if plugin is None or plugin.cli_prefix != "slurm":
        return
    missing = [t for t in ("sbatch", "squeue", "scancel") if shutil.which(t) is None]
    if missing:
        raise WorkflowError(
            f"the SLURM executor (--profile slurm) needs SLURM's commands, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH: run on a machine of the cluster (its login node), or run locally "
            "without the profile: snakemake -c2 results/report.html"
        )


# ---------------------------------------------------------------- environments


def env_dir(name):
    """The directory of a tool environment; relative paths are relative to the workflow directory."""
    p = Path(config["environments"][name]).expanduser()
    return p if p.is_absolute() else Path(workflow.basedir) / p


def using_conda():
    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


def conda_env(name):
    """The conda description of an environment (used only with --use-conda)."""
    return str(Path(workflow.basedir) / "envs" / f"{name}.yaml")


def env_python(name):
    """The Python of a tool environment: the venv's, or under --use-conda the activated env's.

    A Path, not a string: Snakemake does not record it among the params, so moving the project or
    its environments does not re-run every job (the environment's content is tracked by describe_env).
    """
    if using_conda():
        return Path("python")
    python = env_dir(name) / "bin" / "python"
    if not python.exists():
        raise WorkflowError(
            f"environment {name!r} is not set up at {env_dir(name)}: run `bash envs/setup.sh {name}`"
        )
    return python


def python_of(name):
    """An input function: the Python that runs `-m reasonlab <step>` for a rule (environment `name`)."""
    return lambda wildcards: env_python(name)


def speed_only(value):
    """A param Snakemake does not compare between runs (a function of the job's threads is a
    "derived" param): for options that change only speed, so changing them re-runs nothing.
    """
    return lambda wildcards, threads: value


def compute_dtype(rule):
    """An input function: the dtype a job of `rule` runs its model in (a param: it changes results)."""
    return lambda wildcards: PLAN.compute_dtype(rule, wildcards.model)


def compute_placement(rule):
    """A derived param: where a job of `rule` runs its model (speed only, never compared)."""
    return lambda wildcards, threads: PLAN.compute_placement(rule, wildcards.model)


def get_env_python(wildcards):
    return env_python(wildcards.env)


def get_env_conda(wildcards):
    return conda_env(wildcards.env)


def get_env_stamp(wildcards):
    if using_conda():
        return []
    stamp = env_dir(wildcards.env) / ".reasonlab-spec"
    if not stamp.exists():
        raise WorkflowError(
            f"environment {wildcards.env!r} is not set up at {env_dir(wildcards.env)}: run "
            f"`bash envs/setup.sh {wildcards.env}`, or point environments.{wildcards.env} in the "
            "config at an environment built by it"
        )
    return str(stamp)


# ---------------------------------------------------------------- input functions (the plan's answers)


def get_model_spec(wildcards):
    return as_json(PLAN.model_spec(wildcards.model, wildcards.ckpt))


def get_model_inputs(wildcards):
    return PLAN.model_inputs(wildcards.model, wildcards.ckpt)


def get_base_arg(wildcards, input):
    return f"--base {shlex.quote(input.base)}" if "base" in input.keys() else ""


def get_dataset_spec(wildcards):
    return as_json(PLAN.dataset_spec(wildcards.dataset))


def get_dataset_inputs(wildcards):
    return PLAN.dataset_inputs(wildcards.dataset)


def get_dataset_format(wildcards):
    return PLAN.datasets[wildcards.dataset]["format"]


def get_textset_input(wildcards):
    return PLAN.textset_input(wildcards.textset)


def get_capture_input(wildcards):
    return PLAN.capture_input(wildcards.model, wildcards.ckpt, wildcards.promptset)


def get_capture_set(wildcards):
    return PLAN.capture_set(wildcards.promptset)


def get_direction_inputs(wildcards):
    return PLAN.direction_inputs(wildcards.model, wildcards.ckpt, wildcards.contrast)


def get_direction_spec(wildcards):
    return PLAN.direction_spec(wildcards.contrast)


def get_probe_inputs(wildcards):
    return PLAN.probe_inputs(wildcards.model, wildcards.ckpt)


def get_cka_inputs(wildcards):
    return PLAN.cka_inputs(
        wildcards.model, wildcards.ckpt, wildcards.model2, wildcards.ckpt2
    )


def get_intervene_inputs(wildcards):
    return PLAN.intervene_inputs(wildcards.model, wildcards.ckpt, wildcards.spec)


def get_intervene_settings(wildcards):
    return PLAN.intervene_settings(wildcards.spec)


def get_transfer_inputs(wildcards):
    w = wildcards
    return PLAN.transfer_inputs(w.model, w.ckpt, w.spec, w.model2, w.ckpt2)


def get_transfer_settings(wildcards):
    return PLAN.transfer_settings(wildcards.spec, wildcards.model2, wildcards.ckpt2)


def get_step_inputs(wildcards):
    return PLAN.step_inputs(wildcards.model, wildcards.ckpt, wildcards.textset)


def get_embed_inputs(wildcards):
    return PLAN.embed_inputs(wildcards.model, wildcards.ckpt, wildcards.dataset)


def get_map_inputs(wildcards):
    return PLAN.map_inputs(wildcards.group, wildcards.dataset)


def get_map_members(wildcards):
    return PLAN.map_members(wildcards.group, wildcards.dataset)


def get_direction_args(wildcards, input):
    if "chosen" not in input.keys():
        return ""
    return f"--chosen {shlex.quote(input.chosen)} --pt {shlex.quote(input.pt)}"


def get_run_base_handle(wildcards):
    return PLAN.run_base_handle(wildcards.run)


def get_selection_inputs(wildcards):
    return PLAN.selection_inputs(wildcards.run)


def get_scores_arg(wildcards, input):
    return f"--scores {shlex.quote(input.scores)}" if "scores" in input.keys() else ""


def get_run_select(wildcards):
    return PLAN.run_select(wildcards.run)


def get_run_stage(wildcards):
    return PLAN.run_stage(wildcards.run)


def get_run_settings(wildcards):
    return PLAN.run_settings(wildcards.run)


def get_run_threads(wildcards):
    return PLAN.run_threads(wildcards.run)


def get_guided_inputs(wildcards):
    w = wildcards
    return PLAN.guided_inputs(w.model, w.ckpt, w.model2, w.ckpt2, w.dataset)


def get_guided_settings(wildcards):
    return PLAN.guided_settings(wildcards.dataset)


def get_guided_backend(wildcards):
    w = wildcards
    return PLAN.guided_backend(w.model, w.ckpt, w.model2, w.ckpt2)


def get_guided_server(wildcards, threads):
    """A derived param (not compared between runs): where the oracle server is."""
    w = wildcards
    return PLAN.guided_server(w.model, w.ckpt, w.model2, w.ckpt2)


def get_out_dir(wildcards, output):
    """Where an aggregation writes its tables: the directory of its outputs."""
    return str(Path(output[0]).parent)


def get_report_tables(wildcards):
    return PLAN.report_tables()
