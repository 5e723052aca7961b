"""Generation: completions of a prepared dataset's prompts under a model handle, with vLLM or
transformers, in resumable shards, in one output schema.

Backends:
- `vllm`: the offline `LLM` engine (on a CPU: float32 weights and a bounded KV cache); it returns
  the sampled token ids and the top-k logprobs of each step.
- `transformers`: batched `generate` with left padding, for hosts or architectures vLLM cannot serve
  (encoder–decoder models such as T5: the prompt goes to the encoder, the completion is the decoder's).
- `auto`: vLLM when it imports, else transformers.

The engine starts once per job. Prompts are processed in shards of `shard_size`; each finished
shard is written at once under `<output>.shards/`, named by a hash of everything that determines it
(model content, options, its prompts), so a job killed midway and re-run redoes at most the shard
it was in, and the final table is the same as an uninterrupted run's (greedy, or sampling with a
seed on the same backend).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from reasonlab import ReasonlabError
from reasonlab.options import speed
from reasonlab.outputs import write_parquet

log = logging.getLogger(__name__)

COLUMNS = [
    "id", "sample", "prompt", "completion", "n_prompt_tokens", "n_completion_tokens", "finish_reason",
    "backend", "dtype", "prompt_ids", "token_ids", "token_logprobs", "top_ids", "top_logprobs",
]  # fmt: skip
SCHEMA_VERSION = 3  # part of every shard's key: shards written under another schema are not reused


class GenerationError(ReasonlabError):
    """Generation cannot run as configured."""


@dataclass(frozen=True)
class GenOptions:
    """How to prompt and sample. `template` is "chat" (the tokenizer's chat template, with `system`)
    or a format string over the dataset row's fields, e.g. "{question}\\nLet me think step by step."."""

    backend: str = "auto"
    template: str = "chat"
    system: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    logprobs: int = 5  # top-k logprobs kept per generated token
    shard_size: int = 64  # prompts per resumable shard (with sampling, the batches seen)
    max_model_len: int | None = None  # vLLM: longest prompt + completion (None: the model's)
    batch_size: int = speed(16)  # prompts per batch (transformers backend)
    kv_cache_gib: int = speed(1)  # vLLM's KV cache on a CPU
    gpu_memory_utilization: float = speed(0.9)  # vLLM on a GPU: the share of GPU memory it takes
    enforce_eager: bool = speed(False)  # vLLM on a GPU: no CUDA graphs (always eager on a CPU)
    tensor_parallel_size: int | None = speed(None)  # vLLM on GPUs (None: every GPU the job got)


def render_prompts(rows: list[dict], tokenizer, opts: GenOptions) -> list[str]:
    """The prompt text of every dataset row (an empty question is an error naming the row id).

    Template "chat" needs a tokenizer with a chat template (T5's have none): without one it is an
    error asking for a format-string template."""
    from reasonlab.prompts import render_prompt

    if opts.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise GenerationError(
            f"generation.template is 'chat' but tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; set "
            f"generation.template to a format string over the dataset row's fields, "
            f"e.g. '{{question}}\\n'"
        )
    out = []
    for r in rows:
        if not (r.get("question") or "").strip():
            raise GenerationError(
                f"dataset row {r.get('id')!r} has an empty question; it is not sent to the model"
            )
        if opts.template == "chat":
            out.append(
                render_prompt(tokenizer, r["question"], r.get("system") or opts.system, "chat")
            )
        else:
            try:
                out.append(
                    opts.template.format(**{k: v if v is not None else "" for k, v in r.items()})
                )
            except KeyError as e:
                raise GenerationError(
                    f"generation.template names field {e} which dataset rows do not have"
                ) from None
    return out


def pick_backend(name: str) -> str:
    if name in ("vllm", "transformers"):
        return name
    if name != "auto":
        raise GenerationError(
            f"generation.backend must be auto, vllm or transformers, not {name!r}"
        )
    try:
        import vllm  # noqa: F401

        return "vllm"
    except ImportError:
        return "transformers"


def check_backend(backend: str, handle, requested: str | None = None) -> None:
    """Refuse the `vllm` backend (`backend`: the one `pick_backend` chose from `requested`) for an
    encoder–decoder model (T5-style), which vLLM does not serve."""
    from reasonlab.models import is_encoder_decoder

    if backend == "vllm" and is_encoder_decoder(handle):
        how = "" if requested in (None, "vllm") else f" ({requested!r} resolved to vllm)"
        raise GenerationError(
            f"model {handle.model}/{handle.ckpt} ({handle.architecture or handle.model_type}) is an "
            f"encoder–decoder model, which vLLM does not serve; generation.backend is vllm{how}: "
            f"set generation.backend: transformers"
        )


# --------------------------------------------------------------------------------- backends


def vllm_kwargs(handle, opts: GenOptions, placement) -> dict:
    """The keyword arguments of vLLM's `LLM` for a handle on a placement: on a GPU the resolved dtype,
    CUDA graphs (eager only when asked), `gpu_memory_utilization` and `tensor_parallel_size` (default:
    the GPUs the job was given); on a CPU, eager float32 (or the asked dtype) with a bounded KV cache
    (set through VLLM_CPU_KVCACHE_SPACE by the backend)."""
    kwargs = {"model": handle.location, "seed": opts.seed, "dtype": placement.dtype}
    if handle.kind == "hub":
        kwargs["revision"] = handle.commit
    if handle.tokenizer:
        kwargs["tokenizer"] = handle.tokenizer
    if opts.max_model_len:
        kwargs["max_model_len"] = opts.max_model_len
    if placement.on_gpu:
        kwargs["enforce_eager"] = bool(opts.enforce_eager)
        kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        kwargs["tensor_parallel_size"] = opts.tensor_parallel_size or placement.tensor_parallel_size
    else:
        kwargs["enforce_eager"] = True
    return kwargs


class VllmBackend:
    name = "vllm"

    def __init__(self, handle, opts: GenOptions, placement):
        if placement.on_gpu:
            if placement.device != "cuda:0" and placement.gpus == 1:
                # vLLM takes no device index: show it only the chosen GPU (its workers are spawned)
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                ids = visible.split(",") if visible else None
                i = int(placement.device.split(":")[1])
                os.environ["CUDA_VISIBLE_DEVICES"] = ids[i] if ids else str(i)
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.kv_cache_gib))
        from vllm import LLM

        self.kwargs = vllm_kwargs(handle, opts, placement)
        log.info("vLLM engine: %s", self.kwargs)
        self.llm = LLM(**self.kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.opts = opts

    def close(self) -> None:
        """Shut the engine down (its worker processes and their log lines end here)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(
            getattr(engine, "engine_core", None), "shutdown", None
        )
        if shutdown:
            shutdown()
        self.llm = None

    def generate(self, prompts: list[str]) -> list[list[dict]]:
        from vllm import SamplingParams

        o = self.opts
        sp = SamplingParams(
            n=o.n, temperature=o.temperature, top_p=o.top_p, top_k=o.top_k if o.top_k > 0 else -1,
            max_tokens=o.max_new_tokens, stop=o.stop or None, seed=o.seed, logprobs=o.logprobs,
        )  # fmt: skip
        results = []
        for req in self.llm.generate(prompts, sp, use_tqdm=False):
            samples = []
            for s in req.outputs:
                ids = list(s.token_ids)
                steps = s.logprobs or [{} for _ in ids]
                tops = [
                    sorted(step.items(), key=lambda kv: kv[1].rank or 0)[: o.logprobs]
                    for step in steps
                ]
                samples.append(
                    {
                        "completion": s.text,
                        "n_prompt_tokens": len(req.prompt_token_ids),
                        "prompt_ids": list(req.prompt_token_ids),
                        "finish_reason": s.finish_reason or "length",
                        "token_ids": ids,
                        "token_logprobs": [
                            step[t].logprob if t in step else None
                            for t, step in zip(ids, steps, strict=True)
                        ],
                        "top_ids": [[int(k) for k, _ in top] for top in tops],
                        "top_logprobs": [[float(v.logprob) for _, v in top] for top in tops],
                    }
                )
            results.append(samples)
        return results


class TransformersBackend:
    name = "transformers"

    def __init__(self, handle, opts: GenOptions, placement):
        from reasonlab.models import input_device, load_model

        self.model, self.tokenizer = load_model(handle, placement, merge_adapter=True)
        self.device = input_device(self.model)
        self.opts = opts

    def close(self) -> None:
        self.model = None

    def generate(self, prompts: list[str]) -> list[list[dict]]:
        return hf_generate(self.model, self.tokenizer, self.device, prompts, self.opts)


def hf_generate(
    model, tok, device, prompts: list[str], opts: GenOptions, extra=None
) -> list[list[dict]]:
    """Batched `model.generate` (left padding, the generation options `opts`) of every prompt:
    per prompt, its samples as records of the generation schema. `extra(step_logits, new_tokens,
    lengths)`, when given, is called per batch with the per-step logits, the generated tokens
    [rows, steps] and each row's kept length, and returns one dict per row merged into its record
    (what the intervention sweep adds: entropy, first-token distribution).

    An encoder–decoder model (`config.is_encoder_decoder`) reads the prompt with its encoder,
    encoded with the tokenizer's special tokens (T5's closing `</s>`): `prompt_ids` are the encoder's
    input, and the generated tokens are the decoder's after its start token, which is not one of them.
    """
    import torch

    o = opts
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    results = []
    for s in range(0, len(prompts), o.batch_size):
        batch = prompts[s : s + o.batch_size]
        enc = [tok(p, add_special_tokens=seq2seq)["input_ids"] for p in batch]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):  # left padding
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        torch.manual_seed(o.seed + s)
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=o.max_new_tokens,
                do_sample=o.temperature > 0, temperature=o.temperature if o.temperature > 0 else None,
                top_p=o.top_p if o.temperature > 0 else None, top_k=(o.top_k or None) if o.temperature > 0 else None,
                num_return_sequences=o.n, output_logits=True, return_dict_in_generate=True,
                pad_token_id=pad, eos_token_id=tok.eos_token_id, stop_strings=o.stop or None, tokenizer=tok,
            )  # fmt: skip
        # a decoder-only model returns prompt + new tokens; an encoder–decoder the decoder's
        # start token + new tokens
        new = out.sequences[:, 1 if seq2seq else width :].cpu()
        token_lp, top_lp, top_ids = step_logprobs(out.logits, new, o.logprobs)
        lengths = []
        for r in range(new.shape[0]):
            toks = new[r].tolist()
            lengths.append(
                next((k + 1 for k, t in enumerate(toks) if t == tok.eos_token_id), len(toks))
            )
        added = extra(out.logits, new, lengths) if extra else [{} for _ in lengths]
        for i in range(len(batch)):
            samples = []
            for j in range(o.n):
                r = i * o.n + j
                n_tok = lengths[r]
                toks = new[r].tolist()[:n_tok]
                finished = n_tok < o.max_new_tokens or (toks and toks[-1] == tok.eos_token_id)
                text = tok.decode(toks, skip_special_tokens=True)
                stop_hit = next((st for st in o.stop if st in text), None)
                if stop_hit:
                    text = text[: text.index(stop_hit)]
                samples.append(
                    {
                        "completion": text,
                        "n_prompt_tokens": len(enc[i]),
                        "prompt_ids": list(enc[i]),
                        "finish_reason": "stop" if finished or stop_hit else "length",
                        "token_ids": toks,
                        "token_logprobs": token_lp[r, : len(toks)].tolist(),
                        "top_ids": top_ids[r, : len(toks)].tolist(),
                        "top_logprobs": top_lp[r, : len(toks)].tolist(),
                    }
                    | added[r]
                )
            results.append(samples)
    return results


def step_logprobs(step_logits, tokens, k: int):
    """Log-probabilities (float32) of the generated `tokens` [rows, steps] and the top-`k` of each
    step, from `generate`'s per-step logits, one step at a time on the model's device (never a
    [rows x steps x vocabulary] tensor); returned on the CPU: (token [R, S], top values [R, S, k],
    top ids [R, S, k])."""
    import torch

    tok, vals, idx = [], [], []
    for s, logits in enumerate(step_logits):
        lp = torch.log_softmax(logits.float(), dim=-1)
        tok.append(lp.gather(-1, tokens[:, s : s + 1].to(lp.device))[:, 0].cpu())
        top = lp.topk(k, dim=-1)
        vals.append(top.values.cpu())
        idx.append(top.indices.cpu())
    if not tok:
        n = tokens.shape[0]
        return torch.zeros(n, 0), torch.zeros(n, 0, k), torch.zeros(n, 0, k, dtype=torch.long)
    return torch.stack(tok, 1), torch.stack(vals, 1), torch.stack(idx, 1)


# --------------------------------------------------------------------------------- the job


def _shard_key(handle, opts: GenOptions, prompts: list[str], backend: str, dtype: str) -> str:
    blob = json.dumps(
        [SCHEMA_VERSION, handle.content_hash, handle.model, backend, dtype, asdict(opts), prompts],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate_dataset(
    handle_path, data_path, out_path, opts: GenOptions, progress: bool = True,
    compute=None, record_path=None,
) -> dict:  # fmt: skip
    """Generate completions for every row of a prepared dataset; write `out_path` (COLUMNS).

    `compute`: the job's `reasonlab.compute.Request` (default: auto). Finished shards are kept under
    `<out_path>.shards/` until the whole table is written. `record_path`: where to write how the job
    ran (device, dtype, GPUs; see `reasonlab.compute.record`).
    """
    import polars as pl

    from reasonlab import compute as cp
    from reasonlab.data import read_dataset
    from reasonlab.models import load_tokenizer, place, read_handle

    h = read_handle(handle_path)
    rows = read_dataset(data_path).to_dicts()
    backend_name = pick_backend(opts.backend)
    check_backend(backend_name, h, opts.backend)
    machine, placement = place(h, compute, f"{h.model}/{h.ckpt}")
    shard_dir = Path(str(out_path) + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    engine = None
    prompts = render_prompts(rows, load_tokenizer(h), opts)
    t0, done, reused = time.perf_counter(), 0, 0
    frames = []
    shards = range(0, len(rows), opts.shard_size)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=len(rows), desc=f"generating ({h.model}/{h.ckpt}, {backend_name})", unit="prompt"
        )
    for s in shards:
        part_rows, part_prompts = rows[s : s + opts.shard_size], prompts[s : s + opts.shard_size]
        path = (
            shard_dir
            / f"shard-{s // opts.shard_size:05d}-{_shard_key(h, opts, part_prompts, backend_name, placement.dtype)}.parquet"
        )
        if path.exists():
            frames.append(pl.read_parquet(path))
            reused += 1
        else:
            if engine is None:
                backend = VllmBackend if backend_name == "vllm" else TransformersBackend
                engine = backend(h, opts, placement)
            out = engine.generate(part_prompts)
            recs = []
            for r, p, samples in zip(part_rows, part_prompts, out, strict=True):
                for k, smp in enumerate(samples):
                    recs.append({"id": r["id"], "sample": k, "prompt": p, **smp, "n_completion_tokens": len(smp["token_ids"]),
                                 "backend": backend_name, "dtype": placement.dtype})  # fmt: skip
            frame = to_frame(recs)
            write_parquet(frame, path)
            frames.append(frame)
            done += 1
        if bar:
            bar.update(len(part_rows))
    if bar:
        bar.close()
    peak = cp.peak_gpu_memory_gib() if placement.on_gpu else None
    if engine is not None:
        engine.close()
    table = pl.concat(frames) if frames else to_frame([])
    write_parquet(table, out_path)
    shutil.rmtree(shard_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    n_tok = int(table["n_completion_tokens"].sum()) if table.height else 0
    summary = {"rows": len(rows), "completions": table.height, "shards_generated": done, "shards_reused": reused,
               "completion_tokens": n_tok, "seconds": round(seconds, 1), "backend": backend_name}  # fmt: skip
    log.info("generated %s", summary)
    rec = cp.record(placement, machine, "generate", model=h.model, ckpt=h.ckpt, backend=backend_name,
                    seconds=summary["seconds"], peak_gpu_memory_gib=peak)  # fmt: skip
    cp.write_record(rec, record_path)
    return summary | {"compute": rec}


def to_frame(recs: list[dict]):
    import polars as pl

    schema = {
        "id": pl.String, "sample": pl.Int64, "prompt": pl.String, "completion": pl.String,
        "n_prompt_tokens": pl.Int64, "n_completion_tokens": pl.Int64, "finish_reason": pl.String,
        "backend": pl.String, "dtype": pl.String, "prompt_ids": pl.List(pl.Int64), "token_ids": pl.List(pl.Int64), "token_logprobs": pl.List(pl.Float64),
        "top_ids": pl.List(pl.List(pl.Int64)), "top_logprobs": pl.List(pl.List(pl.Float64)),
    }  # fmt: skip
    return pl.DataFrame(recs, schema=schema).select(COLUMNS)
