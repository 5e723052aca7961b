"""Model handles: one small JSON per model × checkpoint, and loading a model from one.

A handle (`results/models/{model}/{ckpt}.json`) says where the weights are (a local directory, or a
hub id with the exact commit found in the local Hugging Face cache), a content hash, the tokenizer,
the dtype and, for a LoRA adapter, the handle of its base model. Every downstream rule takes a
handle as input, never a raw path; because a handle is small, Snakemake compares its content, so
rewriting it unchanged re-runs nothing.

Resolving a handle never downloads unless the config allows it (`download: true`), so it works
offline; loading one never downloads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from reasonlab import ReasonlabError

log = logging.getLogger(__name__)

HANDLE_VERSION = 1
FULL_HASH_LIMIT = (
    64 * 2**20
)  # files up to this size are hashed whole; larger ones by size, head and tail
EDGE = 2**20
STEP = re.compile(r"^step-(\d+)$")  # a training run's checkpoint-N, analysed as step-N


class ModelError(ReasonlabError):
    """A model or checkpoint cannot be found or loaded."""


@dataclass(frozen=True)
class Handle:
    """Where a model × checkpoint's weights are and how to load them."""

    model: str
    ckpt: str
    kind: str  # "local" or "hub"
    path: str | None  # local directory (kind local)
    hub_id: str | None  # hub repository id (kind hub)
    revision: str | None  # the revision asked for (kind hub)
    commit: str | None  # the commit it resolved to in the local cache (kind hub)
    content_hash: str
    tokenizer: str | None  # a directory or hub id; None: the weights' own
    dtype: str
    is_adapter: bool
    base: dict | None  # the base model's handle, for a LoRA adapter
    architecture: str | None
    model_type: str | None
    num_hidden_layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    version: int = HANDLE_VERSION

    @property
    def location(self) -> str:
        """What to pass to `from_pretrained`: the local directory or the hub id."""
        return self.path if self.kind == "local" else self.hub_id

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def looks_like_path(s: str) -> bool:
    """True for strings that are meant as file-system paths rather than hub ids or revisions."""
    return s.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(s))


def local_path(spec: dict, ckpt: str) -> str | None:
    """The local directory a `models.<m>` entry's checkpoint refers to, or None for a hub model.

    A source is local when it exists, starts with /, ./, ../, ~ or results/ (built by the workflow),
    or does not have the owner/name shape of a hub id; `hub:` in front forces a hub id.
    """
    source, value = spec["source"], spec["checkpoints"][ckpt]
    if value is not None and looks_like_path(value):
        return value
    if source.startswith("hub:"):
        return None
    if looks_like_path(source) or source.startswith("results/") or source.count("/") != 1:
        return source
    return None


def hash_directory(path: str | Path) -> str:
    """A content hash of a model directory: every file's relative name and bytes.

    Files larger than 64 MiB contribute their size and first and last MiB, which is enough to tell
    checkpoints apart without reading tens of GB.
    """
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        if rel.startswith((".", "checkpoint-")) or "/." in rel:
            continue  # hidden files, and a training run's intermediate checkpoints beside its final model
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            if size <= FULL_HASH_LIMIT:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    h.update(chunk)
            else:
                h.update(fh.read(EDGE))
                fh.seek(size - EDGE)
                h.update(fh.read(EDGE))
    return "sha256:" + h.hexdigest()


def _read_model_config(directory: Path) -> dict:
    for name in ("config.json", "adapter_config.json"):
        f = directory / name
        if f.exists():
            with f.open() as fh:
                return {"_file": name, **json.load(fh)}
    return {}


def _hub_snapshot(
    hub_id: str, revision: str | None, download: bool, where: str
) -> tuple[Path, str]:
    """The local snapshot directory and commit of `hub_id` at `revision`, from the Hugging Face cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    rev = revision or "main"
    try:
        path = Path(snapshot_download(hub_id, revision=rev, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        if not download:
            cache = (
                os.environ.get("HF_HUB_CACHE")
                or os.environ.get("HF_HOME")
                or "~/.cache/huggingface"
            )
            raise ModelError(
                f"{where}: {hub_id!r} is not a local directory, and as a hub id at revision {rev!r} it is "
                f"not in the local Hugging Face cache ({cache}). "
                f"Download it where there is network (`hf download {hub_id} --revision {rev}`), point "
                f"`source` at a local copy, or set `download: true` for this model."
            ) from e
        try:
            path = Path(snapshot_download(hub_id, revision=rev))
        except Exception as e2:  # network errors come in many types
            raise ModelError(
                f"{where}: could not download {hub_id!r} at revision {rev!r}: {e2}"
            ) from e2
    return path, path.name


# ----------------------------------------------------------------------------- training runs


def saved_steps(output_dir: str | Path) -> list[int]:
    """The steps of the `checkpoint-N` directories a run saved."""
    out = []
    for p in Path(output_dir).glob("checkpoint-*"):
        tail = p.name.removeprefix("checkpoint-")
        if tail.isdigit():
            out.append(int(tail))
    return sorted(out)


def holds_weights(directory: str | Path) -> bool:
    """True when `directory` itself holds a model: config.json with weights (*.safetensors, or *.bin
    other than the Trainer's training_args.bin), or a LoRA adapter (adapter_config.json)."""
    d = Path(directory)
    if (d / "adapter_config.json").is_file():
        return True
    if not (d / "config.json").is_file():
        return False
    weights = [*d.glob("*.safetensors"), *d.glob("*.bin")]
    return any(f.is_file() and f.name != "training_args.bin" for f in weights)


def folder_checkpoints(directory: str | Path) -> dict[str, str | None]:
    """Every checkpoint of a training output directory (LlamaFactory / Hugging Face Trainer layout).

    One `step-N` per `checkpoint-N` sub-directory, ordered by N, whose value is that sub-directory's
    path (written from `directory` as given, so relative stays relative), then `final` -> None (the
    directory itself) when the directory itself holds weights (`holds_weights`). Empty when there
    are neither. Adding a checkpoint-N adds exactly one entry and changes no other.
    """
    root = Path(os.path.expanduser(str(directory)))
    out: dict[str, str | None] = {}
    for step in saved_steps(root):
        if (root / f"checkpoint-{step}").is_dir():
            out[f"step-{step}"] = os.path.join(str(directory), f"checkpoint-{step}")
    if holds_weights(root):
        out["final"] = None
    return out


def checkpoint_dir(output_dir: str | Path, ckpt: str) -> Path:
    """The directory of a run's checkpoint `step-N` or `final`."""
    if ckpt == "final":
        return Path(output_dir)
    m = STEP.match(ckpt)
    if not m:
        raise ModelError(f"a training run's checkpoints are named step-<N> or final, not {ckpt!r}")
    path = Path(output_dir) / f"checkpoint-{m.group(1)}"
    if not path.is_dir():
        raise ModelError(
            f"{ckpt}: the run saved no checkpoint-{m.group(1)} in {output_dir} (saved: "
            f"{', '.join(f'step-{s}' for s in saved_steps(output_dir)) or 'none'})"
        )
    return path


def resolve(model: str, ckpt: str, spec: dict, base: Handle | None = None) -> Handle:
    """Resolve one configured model × checkpoint (a `models.<model>` entry of the config) to a handle.

    `spec["checkpoints"][ckpt]` is None (the source itself), a directory path, or (hub sources) a
    revision. `base` is the base model's handle when the entry is a LoRA adapter (`base:` set).
    """
    where = f"models.{model}.checkpoints.{ckpt}"
    hub_id = revision = commit = None
    if "run" in spec:  # a training run's checkpoint: step-N or final in the run's output directory
        try:
            directory = checkpoint_dir(spec["run_output"], ckpt)
        except ModelError as e:
            raise ModelError(f"{where}: {e}") from None
        return _handle(model, ckpt, spec, "local", directory, None, None, None, base)
    source = spec["source"]
    value = spec["checkpoints"][ckpt]
    local = local_path(spec, ckpt)
    if local is not None:
        if value is not None and not looks_like_path(value):
            raise ModelError(
                f"{where}: {value!r} is not an existing directory; for a local source a checkpoint "
                f"is null (the source itself) or a directory path (absolute, or starting with ./ or ../)"
            )
        kind, directory = "local", Path(os.path.expanduser(local))
    else:
        kind, hub_id, revision = "hub", source.removeprefix("hub:"), value
        directory, commit = _hub_snapshot(hub_id, revision, spec.get("download", False), where)

    return _handle(model, ckpt, spec, kind, directory, hub_id, revision, commit, base)


def _handle(model, ckpt, spec, kind, directory, hub_id, revision, commit, base) -> Handle:
    where = f"models.{model}.checkpoints.{ckpt}"
    if kind == "local" and not directory.is_dir():
        raise ModelError(
            f"{where}: model directory {str(directory)!r} does not exist (from models.{model}.source "
            f"or its checkpoint entry); check the path, or build it first"
        )
    cfg = _read_model_config(directory)
    if not cfg:
        raise ModelError(
            f"{where}: {str(directory)!r} has no config.json or adapter_config.json; "
            f"is it a Hugging Face model directory?"
        )
    is_adapter = cfg["_file"] == "adapter_config.json"
    if is_adapter and base is None:
        raise ModelError(
            f"{where}: {str(directory)!r} holds a LoRA adapter; name the model it adapts with "
            f"models.{model}.base: <model> or <model>/<ckpt>"
        )
    content = f"git:{commit}" if kind == "hub" else hash_directory(directory)
    # an adapter has the architecture and shape of its base model
    shape = cfg if not is_adapter else {
        "architectures": [base.architecture], "model_type": base.model_type, "hidden_size": base.hidden_size,
        "num_hidden_layers": base.num_hidden_layers, "vocab_size": base.vocab_size,
    }  # fmt: skip
    return Handle(
        model=model,
        ckpt=ckpt,
        kind=kind,
        path=str(directory) if kind == "local" else None,
        hub_id=hub_id,
        revision=revision,
        commit=commit,
        content_hash=content,
        tokenizer=spec.get("tokenizer"),
        dtype=spec.get("dtype", "auto"),
        is_adapter=is_adapter,
        base=json.loads(base.to_json()) if is_adapter else None,
        architecture=(shape.get("architectures") or [None])[0],
        model_type=shape.get("model_type"),
        num_hidden_layers=shape.get("num_hidden_layers"),
        hidden_size=shape.get("hidden_size"),
        vocab_size=shape.get("vocab_size"),
    )


def write_handle(handle: Handle, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(handle.to_json())


def read_handle(path: str | Path) -> Handle:
    """Read a handle JSON written by `resolve_model`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable model handle ({e}); re-run resolve_model") from e
    if data.get("version") != HANDLE_VERSION:
        raise ModelError(
            f"{path}: handle version {data.get('version')} is not {HANDLE_VERSION}; re-run resolve_model"
        )
    # a relative weights path is relative to the working directory the handle was written in,
    # <workdir>/results/models/<model>/<ckpt>.json: resolve it from there when read from elsewhere
    parents = Path(path).resolve().parents
    workdir = parents[3] if len(parents) > 3 else parents[-1]
    for h in (data, data.get("base")):
        relative = (
            h and h.get("path") and not os.path.isabs(h["path"]) and not os.path.exists(h["path"])
        )
        if relative and (workdir / h["path"]).exists():
            h["path"] = str(workdir / h["path"])
    return Handle(**data)


def _as_handle(h: Handle | dict | str | Path) -> Handle:
    if isinstance(h, Handle):
        return h
    if isinstance(h, dict):
        return Handle(**h)
    return read_handle(h)


def _from_pretrained_kwargs(h: Handle) -> dict:
    if h.kind == "hub":
        return {"revision": h.commit, "local_files_only": True}
    return {"local_files_only": True}


def load_tokenizer(handle: Handle | dict | str | Path):
    """The tokenizer of a handle (its own `tokenizer` setting, else the weights' directory or base model's)."""
    from transformers import AutoTokenizer

    h = _as_handle(handle)
    if h.tokenizer:
        src, kwargs = h.tokenizer, {"local_files_only": True}
    elif h.is_adapter and h.base and not (Path(h.location) / "tokenizer_config.json").exists():
        return load_tokenizer(h.base)
    else:
        src, kwargs = h.location, _from_pretrained_kwargs(h)
    try:
        return AutoTokenizer.from_pretrained(src, **kwargs)
    except OSError as e:
        raise ModelError(
            f"model {h.model}/{h.ckpt}: cannot load a tokenizer from {src!r}: {e}"
        ) from e


def cpu_placement(handle: Handle | dict | str | Path):
    """Where a model goes when no placement is given: the CPU, in the handle's dtype (float32 for
    auto)."""
    from reasonlab.compute import Placement

    h = _as_handle(handle)
    return Placement("cpu", "float32" if h.dtype == "auto" else h.dtype, None, 0, 1)


def weights_kwargs(placement) -> dict:
    """What `from_pretrained` receives for a placement: the dtype, and where the weights go (loaded
    straight onto the GPU, or spread by accelerate's `device_map`; nothing on a CPU)."""
    from reasonlab.compute import torch_dtype

    kwargs = {"dtype": torch_dtype(placement.dtype)}
    if placement.device_map:
        kwargs["device_map"] = placement.device_map
    elif placement.on_gpu:
        kwargs["device_map"] = {"": placement.device}
    return kwargs


def checkpoint_dtype_of(handle: Handle | dict | str | Path) -> str | None:
    """The dtype a handle's weights were saved in (an adapter's: its base model's), or None."""
    from reasonlab.compute import checkpoint_dtype

    h = _as_handle(handle)
    if h.is_adapter and h.base:
        return checkpoint_dtype_of(h.base)
    if h.kind == "hub":  # the snapshot in the local cache
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(h.hub_id, "config.json", revision=h.commit)
        return checkpoint_dtype(Path(found).parent) if isinstance(found, str) else None
    return checkpoint_dtype(h.location)


def place(handle: Handle | dict | str | Path, request=None, where: str = ""):
    """(machine, placement) of a job that loads `handle`: the request (a
    `reasonlab.compute.Request`; default auto) resolved against what this job sees, logged."""
    from reasonlab import compute

    machine = compute.Machine.detect()
    placement = compute.resolve(
        request or compute.Request(), machine, checkpoint_dtype_of(handle), where
    )
    log.info("placement: %s", placement)
    return machine, placement


def load_placed(handle: Handle, request=None, where: str = ""):
    """(machine, placement, model, tokenizer) of a job that runs `handle`'s model: `place` it,
    then load it there (a LoRA adapter merged into its base)."""
    machine, placement = place(handle, request, where)
    model, tok = load_model(handle, placement, merge_adapter=True)
    return machine, placement, model, tok


def input_device(model):
    """Where a loaded model's inputs go: its input embeddings' device (the first device when
    accelerate spread it over several)."""
    return model.get_input_embeddings().weight.device


def load_config(handle: Handle | dict | str | Path):
    """The transformers config of a handle's weights (an adapter's: its base model's), read from
    the local directory or the local Hugging Face cache, never downloaded."""
    from transformers import AutoConfig

    h = _as_handle(handle)
    if h.is_adapter and h.base:
        return load_config(h.base)
    try:
        return AutoConfig.from_pretrained(h.location, **_from_pretrained_kwargs(h))
    except (OSError, ValueError) as e:
        raise ModelError(
            f"model {h.model}/{h.ckpt}: cannot read a model config from {h.location!r}: {e}"
        ) from e


def is_encoder_decoder(handle: Handle | dict | str | Path) -> bool:
    """True when a handle's model is an encoder–decoder (T5-style, `config.is_encoder_decoder`)."""
    return bool(getattr(load_config(handle), "is_encoder_decoder", False))


def load_model(
    handle: Handle | dict | str | Path,
    placement=None,
    merge_adapter: bool = False,
):
    """Load (model, tokenizer) from a handle, in eval mode, placed by `placement`
    (a `reasonlab.compute.Placement`; default: the CPU in the handle's dtype, float32 for auto).

    A decoder-only model loads with `AutoModelForCausalLM`, an encoder–decoder one
    (`config.is_encoder_decoder`, e.g. T5) with `AutoModelForSeq2SeqLM`. A LoRA adapter is loaded
    on top of its base model with peft; `merge_adapter=True` merges it into the weights.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    h = _as_handle(handle)
    placement = placement or cpu_placement(h)
    try:
        if h.is_adapter:
            from peft import PeftModel

            base_model, _ = load_model(h.base, placement)
            model = PeftModel.from_pretrained(base_model, h.location, is_trainable=False)
            if merge_adapter:
                model = model.merge_and_unload()
        else:
            auto = AutoModelForSeq2SeqLM if is_encoder_decoder(h) else AutoModelForCausalLM
            model = auto.from_pretrained(
                h.location, **weights_kwargs(placement), **_from_pretrained_kwargs(h)
            )
    except OSError as e:
        raise ModelError(
            f"model {h.model}/{h.ckpt}: cannot load weights from {h.location!r}: {e}"
        ) from e
    model.eval()
    return model, load_tokenizer(h)
