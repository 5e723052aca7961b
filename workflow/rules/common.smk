# Helpers, config validation and wildcard constraints shared by every stage.
# Parse time stays cheap: nothing here imports torch or reads a model.
import json
import shutil
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from reasonlab.config import ConfigError, config_hash, validate  # noqa: E402
from reasonlab.data import is_local, missing_sources  # noqa: E402
from reasonlab.models import local_path  # noqa: E402

try:
    _validated = validate(config, workflow.source_path("../schemas/config.schema.yaml"))
except ConfigError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_validated)
_missing = missing_sources(config["datasets"])
if _missing:
    raise WorkflowError("\n".join(_missing))

SCRIPTS = Path(workflow.basedir) / "scripts"
MODELS = config["models"]
DATASETS = config["datasets"]
ENVIRONMENTS = ["core", "train", "gen"]
CONFIG_HASH = config_hash(config)


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    ckpt=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    dataset=r"[A-Za-z0-9][A-Za-z0-9_.-]*",
    textset=r"[A-Za-z0-9][A-Za-z0-9_.-]*(?:@[A-Za-z0-9][A-Za-z0-9_.-]*@[A-Za-z0-9][A-Za-z0-9_.-]*)?",
    env="|".join(ENVIRONMENTS),


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


CORE_CONDA = conda_env("core")


def get_env_conda(wildcards):
    return conda_env(wildcards.env)


def canonical(obj):
    """`obj` with every mapping's keys sorted, recursively. Snakemake compares a rule's params by
    their repr, so params built from config must not depend on the order keys are written in.
    """
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return obj


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


def get_env_python(wildcards):
    return env_python(wildcards.env)


def get_train_python(wildcards):
    return env_python("train")


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


# ---------------------------------------------------------------- models


def model_checkpoints(model):
    return list(MODELS[model]["checkpoints"])


def all_handles():
    return [
        f"results/models/{m}/{c}.json" for m in MODELS for c in model_checkpoints(m)
    ]


def split_ref(ref):
    """'<model>' or '<model>/<ckpt>' -> (model, ckpt), the model's first checkpoint by default."""
    m, _, c = ref.partition("/")
    return m, c or model_checkpoints(m)[0]


def _base_of(model):
    """(base model, base ckpt) of a LoRA adapter entry or of a run's model, or None."""
    spec = MODELS[model]
    if "run" in spec:
        return split_ref(TRAINING[spec["run"]]["base"])
    return split_ref(spec["base"]) if spec.get("base") else None


def get_model_spec(wildcards):
    """The model's config entry with only this checkpoint, so adding a checkpoint re-runs nothing else."""
    spec = dict(MODELS[wildcards.model])
    spec["checkpoints"] = {wildcards.ckpt: spec["checkpoints"][wildcards.ckpt]}
    if "run" in spec:
        spec["run_output"] = run_output(spec["run"])
    return canonical(spec)


def get_model_inputs(wildcards):
    """The weights directory when it is local (so the rule that builds it runs first), and the base handle."""
    spec = MODELS[wildcards.model]
    local = (
        run_output(spec["run"]) if "run" in spec else local_path(spec, wildcards.ckpt)
    )
    inputs = {}
    if local is not None and (
        local.startswith("results/") or Path(local).expanduser().exists()
    ):
        inputs["weights"] = local
    base = _base_of(wildcards.model)
    if base:
        inputs["base"] = "results/models/{}/{}.json".format(*base)
    return inputs


# ---------------------------------------------------------------- training

TRAINING = config["training"]
# the defaults of every run (a shipped resource, so found beside the Snakefile)
LLAMAFACTORY_TEMPLATE = str(
    Path(workflow.basedir) / "resources" / "llamafactory" / "train.yaml"
)


def run_output(run):
    return f"results/training/{run}/output"


def run_handles():
    """The handles of every analysed checkpoint of a training run."""
    return [
        f"results/models/{m}/{c}.json"
        for m, spec in MODELS.items()
        if "run" in spec
        for c in model_checkpoints(m)
    ]


def get_run_base_handle(wildcards):
    return "results/models/{}/{}.json".format(
        *split_ref(TRAINING[wildcards.run]["base"])
    )


def get_selection_inputs(wildcards):
    """The run's dataset, and its scores under the base model when rows are chosen by score."""
    spec = TRAINING[wildcards.run]
    inputs = {"data": f"results/data/{spec['data']}.parquet"}
    if spec["select"]["keep"] in ("high", "low"):
        m, c = split_ref(spec["base"])
        inputs["scores"] = f"results/scores/{m}/{c}/{spec['data']}.sequences.parquet"
    return inputs


def get_run_settings(wildcards):
    """The run's LlamaFactory settings as JSON (a run-scoped param: editing one run re-runs only it)."""
    return json.dumps(TRAINING[wildcards.run]["llamafactory"], sort_keys=True)


def get_run_threads(wildcards):
    return TRAINING[wildcards.run]["threads"]


def get_run_stage(wildcards):
    return TRAINING[wildcards.run]["llamafactory"].get("stage", "sft")


def get_run_select(wildcards):
    return canonical(TRAINING[wildcards.run]["select"])


# ---------------------------------------------------------------- datasets


def get_dataset_spec(wildcards):
    return canonical(DATASETS[wildcards.dataset])


def get_dataset_inputs(wildcards):
    """The source file when it is local, so that rules producing it (the demo) run first."""
    source = DATASETS[wildcards.dataset]["source"]
    return {"source": source} if is_local(source) else {}


# ---------------------------------------------------------------- generation

GENERATION = config["generation"]
GEN_OPTIONS_JSON = json.dumps(
    {
        k: v
        for k, v in GENERATION.items()
        if k
        not in ("datasets", "models", "reasoning_start", "reasoning_end", "threads")
    },
    sort_keys=True,
)
GEN_JOBS = [
    (m, c, d)
    for m in sorted(GENERATION["models"] or MODELS)
    for c in model_checkpoints(m)
    for d in sorted(GENERATION["datasets"])
]


def get_gen_python(wildcards):
    return env_python("gen")


def get_dataset_format(wildcards):
    return canonical(DATASETS[wildcards.dataset])["format"]


def gen_outputs():
    return [f"results/generations/{m}/{c}/{d}.parquet" for m, c, d in GEN_JOBS]


def gen_job_list():
    return [[m, c, model_checkpoints(m).index(c), d] for m, c, d in GEN_JOBS]


# ---------------------------------------------------------------- scoring

SCORE = config["score"]
SCORE_OPTIONS = {
    k: SCORE[k]
    for k in (
        "scope",
        "boundary",
        "append_eos",
        "max_length",
        "truncation",
        "token_budget",
        "compile",
    )
}
# job lists are in a canonical order (models and text sets by name, checkpoints as listed): the
# aggregation rules take them as params, which must not change when config keys are reordered
SCORE_JOBS = [
    (m, c, t)
    for m in sorted(SCORE["models"] or MODELS)
    for c in model_checkpoints(m)
    for t in sorted(SCORE["textsets"])
]
# every generation job's completions scored under the checkpoint that generated them
SCORE_JOBS = sorted(
    set(SCORE_JOBS)
    | {
        (m, c, f"{d}@{m}@{c}") for m, c, d in (GEN_JOBS if SCORE["generations"] else [])
    },
    key=lambda j: (j[0], model_checkpoints(j[0]).index(j[1]), j[2]),
)


def get_textset_input(wildcards):
    """A text set is a prepared dataset, or `<dataset>@<model>@<ckpt>`: that checkpoint's graded
    generations on the dataset."""
    dataset, _, generator = wildcards.textset.partition("@")
    if generator:
        model, ckpt = generator.split("@")
        return f"results/generations/{model}/{ckpt}/{dataset}.parquet"
    return f"results/data/{dataset}.parquet"


def score_outputs(kind):
    return [f"results/scores/{m}/{c}/{t}.{kind}.parquet" for m, c, t in SCORE_JOBS]


def score_job_list():
    """(model, ckpt, checkpoint order, text set) of every score job, for the aggregation."""
    return [[m, c, model_checkpoints(m).index(c), t] for m, c, t in SCORE_JOBS]


def score_detailed_output():
    return (
        ["results/aggregate/score_tokens.parquet"] if SCORE["detailed_tokens"] else []
    )


# ---------------------------------------------------------------- report

# name -> aggregated Parquet; every stage registers the tables its report section reads.
REPORT_TABLES = {}


def register_report_table(name, path):
    REPORT_TABLES[name] = path


def get_report_tables(wildcards):
    return REPORT_TABLES


def get_final_output():
    return ["results/report.html"]
