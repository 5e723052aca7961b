"""Where and in what precision a job runs a model: one policy for every stage that loads one.

Config: `compute: {device, dtype, device_map}`, overridable per stage (`score.device`, ...), and a
model's own `dtype` above both. Two halves:

- at plan time (`request`): what the config and the GPUs each rule is given decide. The resolved
  dtype request changes results, so it is a Snakemake param: an explicit dtype is itself; `auto` is
  `float32` for a job planned on a CPU and `auto` (the checkpoint's own dtype) for one planned on a
  GPU. Device and device map change only speed and are not compared.
- at job time (`resolve`): what the job actually sees (`Machine.detect()`), giving a `Placement`:
  the device, the concrete dtype, the accelerate `device_map` for a model spread over several GPUs,
  and vLLM's `tensor_parallel_size`. A GPU asked for where there is none is one clear error naming
  the key and the fix.

Pure functions over plain values; torch is imported only by `Machine.detect` and `torch_dtype`.
Statistics are always accumulated in float32 by the stages, whatever the model dtype.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from reasonlab import ReasonlabError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DEVICE_MAPS = (None, "auto")
FIELDS = ("device", "dtype", "device_map")


class ComputeError(ReasonlabError):
    """The asked-for device or dtype cannot be had in this job."""


@dataclass(frozen=True)
class Request:
    """What the config asks of one job. `keys` names, for each field, the config key it came from
    (for messages). `gpu_planned`: the plan expects this job to see a GPU."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    gpu_planned: bool = False
    keys: tuple[tuple[str, str], ...] = (
        ("device", "compute.device"),
        ("dtype", "compute.dtype"),
        ("device_map", "compute.device_map"),
    )

    def key(self, name: str) -> str:
        return dict(self.keys).get(name, f"compute.{name}")

    def speed(self) -> dict:
        """The fields that change only speed (passed to a job outside its params)."""
        return {"device": self.device, "device_map": self.device_map}


def request(
    compute: dict,
    stage: dict | None,
    stage_name: str,
    model_dtype: str | None,
    model: str,
    gpus: int,
) -> Request:
    """The request of a job of `stage_name` for `model`.

    Precedence: the model's own `dtype` (unless auto), then the stage's setting (unless null), then
    `compute`. `gpus`: how many GPUs the plan expects the job to be given (its rule's `gpu`
    resource, or this machine's GPUs when run locally).
    """
    stage = stage or {}
    picked, keys = {}, []
    for f in FIELDS:
        if stage.get(f) is not None:
            picked[f], where = stage[f], f"{stage_name}.{f}"
        else:
            picked[f], where = (
                compute.get(f, Request.__dataclass_fields__[f].default),
                f"compute.{f}",
            )
        keys.append((f, where))
    if model_dtype and model_dtype != "auto":
        picked["dtype"] = model_dtype
        keys[1] = ("dtype", f"models.{model}.dtype")
    dev = picked["device"]
    if not DEVICE.match(str(dev)):
        raise ComputeError(
            f"{dict(keys)['device']} must be auto, cpu, cuda or cuda:<N>, not {dev!r}"
        )
    if picked["dtype"] not in DTYPES:
        raise ComputeError(f"{dict(keys)['dtype']} must be one of {', '.join(DTYPES)}, not {picked['dtype']!r}")  # fmt: skip
    on_gpu = dev.startswith("cuda") or (dev == "auto" and gpus > 0)
    dtype = picked["dtype"]
    if dtype == "auto" and not on_gpu:
        dtype = "float32"
    return Request(dev, dtype, picked["device_map"], on_gpu, tuple(keys))


def rule_gpus(
    rules: list[str], overwrite: dict, default: dict | None, local: int
) -> dict[str, int]:
    """GPUs each rule's jobs are given: its `gpu` (or `gpus`) resource from the profile or
    `--set-resources` (`overwrite`: rule -> resources; `default`: default resources), else, when no
    rule is given GPUs that way (a local run), the GPUs of this machine (`local`)."""

    def value(res) -> int | None:
        for name in ("gpu", "gpus"):
            if res and name in res:
                v = res[name]
                v = getattr(v, "value", v)
                try:
                    return int(v)
                except (TypeError, ValueError):
                    return None
        return None

    explicit = {r: value(overwrite.get(r)) for r in rules}
    base = value(default)
    cluster = base is not None or any(v is not None for v in explicit.values())
    out = {}
    for r in rules:
        v = explicit[r] if explicit[r] is not None else base
        out[r] = v if v is not None else (0 if cluster else local)
    return out


def local_gpus(environ: dict | None = None, proc: str = "/proc/driver/nvidia/gpus") -> int:
    """NVIDIA GPUs this process can see, without importing torch: CUDA_VISIBLE_DEVICES when set,
    else the driver's list."""
    env = os.environ if environ is None else environ
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    p = Path(proc)
    return len(list(p.iterdir())) if p.is_dir() else 0


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16: bool = True


@dataclass(frozen=True)
class Machine:
    """What a job sees: its GPUs (after CUDA_VISIBLE_DEVICES) and CPU threads."""

    gpus: tuple[Gpu, ...] = ()
    threads: int = 1

    @classmethod
    def detect(cls) -> Machine:
        import torch

        gpus = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append(
                    Gpu(p.name, round(p.total_memory / 2**30, 1), (p.major, p.minor) >= (8, 0))
                )
        return cls(tuple(gpus), torch.get_num_threads())


@dataclass(frozen=True)
class Placement:
    """Where a job runs its model. `device`: where inputs go and where a single-device model lives;
    `device_map`: accelerate's placement over several devices (None: the whole model on `device`);
    `gpus`: GPUs used; `tensor_parallel_size`: vLLM's."""

    device: str
    dtype: str
    device_map: str | None
    gpus: int
    tensor_parallel_size: int

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def checkpoint_dtype(model_dir: str | Path | None) -> str | None:
    """The dtype a Hugging Face checkpoint was saved in (its config.json), or None."""
    if not model_dir:
        return None
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    for d in (data, data.get("text_config") or {}):
        v = d.get("dtype") or d.get("torch_dtype")
        if v in DTYPES[1:]:
            return v
    return None


def resolve(
    req: Request, machine: Machine, ckpt_dtype: str | None = None, where: str = ""
) -> Placement:
    """The placement of a job: `req` (from the plan) against what the job sees.

    `ckpt_dtype`: the checkpoint's own dtype (for `auto` on a GPU; float32 when unknown).
    """
    n = len(machine.gpus)
    job = f" ({where})" if where else ""
    if req.device == "cpu" or (req.device == "auto" and not n):
        if req.gpu_planned:
            raise ComputeError(
                f"this job{job} was planned for a GPU but sees none (torch.cuda.is_available() is "
                "False): give its rule a GPU (slurm/config.yaml set-resources: <rule>: gpu: 1) or set "
                f"{req.key('device')}: cpu"
            )
        dtype = "float32" if req.dtype == "auto" else req.dtype
        return Placement("cpu", dtype, None, 0, 1)
    if not n:
        raise ComputeError(
            f"{req.key('device')} is {req.device!r} but this job{job} sees no GPU "
            "(torch.cuda.is_available() is False): ask SLURM for one (slurm/config.yaml "
            f"set-resources: <rule>: gpu: 1), or set {req.key('device')}: auto (a GPU when there "
            "is one) or cpu"
        )
    if req.device.startswith("cuda:"):
        i = int(req.device.split(":")[1])
        if i >= n:
            raise ComputeError(
                f"{req.key('device')} is {req.device!r} but this job{job} sees {n} GPU(s) "
                f"(cuda:0 to cuda:{n - 1}): pick one of those, or set {req.key('device')}: auto"
            )
        used, device, device_map = 1, req.device, req.device_map
    else:
        used, device = n, "cuda:0"
        device_map = req.device_map or ("auto" if n > 1 else None)
    dtype = req.dtype if req.dtype != "auto" else (ckpt_dtype or "float32")
    if dtype == "bfloat16" and not all(g.bf16 for g in machine.gpus[:used]):
        raise ComputeError(
            f"bfloat16 ({req.key('dtype')}) is not supported by {machine.gpus[0].name}{job}: set "
            f"{req.key('dtype')}: float16 or float32"
        )
    return Placement(device, dtype, device_map, used, used)


def record(placement: Placement, machine: Machine, stage: str, **extra) -> dict:
    """What a job logs and writes about how it ran (shown in the report's run overview). The
    process's peak GPU memory is read here unless `extra` gives it (taken earlier)."""
    used = machine.gpus[: placement.gpus]
    if "peak_gpu_memory_gib" not in extra:
        extra["peak_gpu_memory_gib"] = peak_gpu_memory_gib() if placement.on_gpu else None
    return {
        "stage": stage,
        **asdict(placement),
        "gpu_name": ", ".join(sorted({g.name for g in used})) or None,
        "gpu_memory_gib": round(sum(g.memory_gib for g in used), 1) if used else None,
        "threads": machine.threads,
        **extra,
    }


def peak_gpu_memory_gib() -> float | None:
    """The largest GPU memory this process allocated (all its GPUs), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    total = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return round(total / 2**30, 2)


def torch_dtype(name: str):
    """The torch dtype of a concrete dtype name."""
    import torch

    if name not in DTYPES[1:]:
        raise ComputeError(f"not a concrete dtype: {name!r}")
    return getattr(torch, name)


def write_record(rec: dict, path: str | Path | None) -> None:
    """Log how a job ran and, when `path` is given, write it there (JSON)."""
    import logging

    logging.getLogger(__name__).info("ran with %s", rec)
    if path is None:
        return
    from reasonlab.outputs import write_text

    write_text(path, json.dumps(rec, indent=1, sort_keys=True) + "\n")
