"""Residual-stream activations of unmodified Hugging Face models, captured with forward hooks into a
store keyed by content.

Sites. `resid_pre.<l>` is the input of decoder layer l (l = 0 … L-1: layer 0's input is the
embedding, scaled where the architecture scales it); `resid_final` is the last layer's output
*before* the final norm. A layer index l in config means `resid_pre.l` for l < L and `resid_final`
for l = L. `output_hidden_states` agrees with `resid_pre.l` for l < L, but its last entry in
Qwen2/Llama/Gemma2/GPT-2 is taken *after* the final norm, so it is not `resid_final`. Where the
layers and the final norm live is `decoder_parts` (one map for every supported architecture).

Positions (per text; the rules are stored separately):
- `last_prompt`: the prompt's last token (what predicts the first completion token);
- `prompt_tail` or `prompt_tail:K`: the prompt's last K tokens (default K: the chat template's
  tokens after the instruction, as refusal_direction's "post-instruction" positions);
- `completion_mean`: the mean over the completion's tokens (texts with a completion);
- `completion_all`: every completion token, for the first `every_token_texts` texts only.

The store. An entry is (checkpoint content hash and dtype, text = the exact token ids, position
rule, layers): `<store>/<content>-<dtype>/shards/<id>.safetensors` holds one batch of texts, its
`.json` (written last, atomically: its presence means the shard is complete) names them. Capturing
again computes only texts no shard holds; the same checkpoint under two model names shares one
store directory; a killed job's finished shards stay, so a re-run resumes. Two jobs never compute
the same text at once: under a short `mkdir` lock (atomic on NFS too) a job claims the texts it
will compute in a claim file, refreshed after each batch; other jobs wait for claimed texts and
take a claim over only when it is stale (its process gone on the same host, or no refresh for
`claim_stale_s`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reasonlab import ReasonlabError
from reasonlab.options import speed
from reasonlab.outputs import write_parquet, write_text

log = logging.getLogger(__name__)

POSITION_RULES = ("last_prompt", "prompt_tail", "completion_mean", "completion_all")
FINAL = "resid_final"
STORE_VERSION = 1


class ActivationError(ReasonlabError):
    """Bad capture input: an unsupported architecture, a layer or position out of range."""


# ------------------------------------------------------------------------------ architectures

# (layers, final norm) attribute paths, tried in order on the model (a peft wrapper is unwrapped)
LAYOUTS = (
    ("model.layers", "model.norm"),  # Qwen2, Qwen3, Llama, Mistral, Gemma, Gemma2, Phi3, ...
    ("transformer.h", "transformer.ln_f"),  # GPT-2, GPT-J
    ("gpt_neox.layers", "gpt_neox.final_layer_norm"),  # GPT-NeoX, Pythia
    ("model.decoder.layers", "model.decoder.final_layer_norm"),  # OPT
)


@dataclass
class Parts:
    """A decoder's blocks and final norm (modules of the loaded model)."""

    layers: object  # torch.nn.ModuleList
    norm: object  # torch.nn.Module
    layout: str  # the attribute path of the layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _attr(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_parts(model) -> Parts:
    """The decoder blocks and final norm of a causal LM, or one error naming the architecture."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layers_path, norm_path in LAYOUTS:
        layers, norm = _attr(base, layers_path), _attr(base, norm_path)
        if layers is not None and norm is not None and hasattr(layers, "__len__"):
            return Parts(layers, norm, layers_path)
    cfg = getattr(base, "config", None)
    raise ActivationError(
        f"{type(base).__name__} (model_type {getattr(cfg, 'model_type', '?')!r}): unsupported "
        "architecture for activation capture (no decoder layers and final norm at "
        + ", ".join(f"{a} / {b}" for a, b in LAYOUTS)
        + "); add its layout to reasonlab.activations.LAYOUTS"
    )


# per block: the modules whose outputs are added to the residual stream, tried in order
WRITERS = (
    ("post_attention_layernorm", "post_feedforward_layernorm"),  # Gemma2/3: normed before the add
    ("self_attn", "mlp"),  # Qwen2, Llama, Mistral, Gemma
    ("self_attn", "fc2"),  # OPT
    ("attn", "mlp"),  # GPT-2, GPT-J
    ("attention", "mlp"),  # GPT-NeoX
)


def residual_writers(block) -> list:
    """The submodules of a decoder block whose outputs are added to the residual stream."""
    for names in WRITERS:
        mods = [getattr(block, n, None) for n in names]
        if all(m is not None for m in mods):
            return mods
    raise ActivationError(
        f"{type(block).__name__}: no known attention/MLP outputs to intervene on (tried "
        + ", ".join(" + ".join(n) for n in WRITERS)
        + "); add them to reasonlab.activations.WRITERS"
    )


def site_name(layer: int, n_layers: int) -> str:
    return FINAL if layer == n_layers else f"resid_pre.{layer}"


def check_layers(layers, n_layers: int, key: str = "activations.layers") -> list[int]:
    """`all` or a list of indices in [0, n_layers] (negative ones count from n_layers + 1)."""
    if layers in (None, "all"):
        return list(range(n_layers + 1))
    out = []
    for v in layers:
        i = v + n_layers + 1 if isinstance(v, int) and v < 0 else v
        if not isinstance(i, int) or not 0 <= i <= n_layers:
            raise ActivationError(
                f"{key}: layer {v!r} is out of range for a model with {n_layers} layers "
                f"(0 … {n_layers}, {n_layers} = the last layer's output before the final norm)"
            )
        out.append(i)
    return sorted(set(out))


def hidden_of(x):
    """The hidden states in a block's input or output: a tensor, or the first element of a tuple."""
    return x[0] if isinstance(x, tuple | list) else x


# ------------------------------------------------------------------------------ positions


@dataclass(frozen=True)
class Position:
    rule: str
    k: int | None = None  # prompt_tail's K

    @property
    def name(self) -> str:
        return f"{self.rule}:{self.k}" if self.k is not None else self.rule

    @property
    def needs_completion(self) -> bool:
        return self.rule.startswith("completion")


def parse_positions(specs: Sequence[str], tail_default: int | None = None,
                    key: str = "activations.positions") -> list[Position]:  # fmt: skip
    """Position rules from config words (`prompt_tail` takes `tail_default` tokens)."""
    out = []
    for s in specs:
        rule, _, k = str(s).partition(":")
        if rule not in POSITION_RULES or (k and rule != "prompt_tail"):
            raise ActivationError(
                f"{key}: unknown position {s!r}; use one of {', '.join(POSITION_RULES)} "
                "(prompt_tail:K for the last K prompt tokens)"
            )
        if rule == "prompt_tail":
            n = int(k) if k.isdigit() else tail_default
            if not n or n < 1:
                raise ActivationError(
                    f"{key}: {s!r} needs a positive number of tokens (prompt_tail:K)"
                )
            out.append(Position(rule, n))
        else:
            out.append(Position(rule))
    return out


def post_instruction_tokens(tokenizer, template: str = "chat", system: str | None = None) -> int:
    """How many tokens the prompt template adds after the instruction (for ChatML: the end of the
    user turn and the assistant's header), by rendering a marker question."""
    from reasonlab.prompts import render_prompt

    marker = "Zq marker question qZ"
    if template == "chat":
        text = render_prompt(tokenizer, marker, system, "chat")
    else:
        text = template.replace("{question}", marker)
    cut = text.index(marker) + len(marker)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return max(1, sum(1 for start, _ in enc["offset_mapping"] if start >= cut))


# ------------------------------------------------------------------------------ texts


@dataclass
class Text:
    """One text to capture: exact token ids, where the prompt ends, and its labels."""

    id: str
    ids: list[int]
    n_prompt: int
    labels: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The text's content key: a hash of its exact token ids and prompt boundary."""
        payload = json.dumps([self.n_prompt, self.ids], separators=(",", ":")).encode()
        return hashlib.sha256(payload).hexdigest()[:32]


def dataset_texts(df, tokenizer, template: str = "chat", system: str | None = None,
                  set_name: str = "", max_texts: int | None = None,
                  solution: bool = False) -> list[Text]:  # fmt: skip
    """A prepared dataset's prompts, rendered as generation renders them (chat template or a
    format string), tokenized without special tokens (as the generators do).

    With `solution`, each prompt is followed by the row's reference solution, tokenized on its own
    (the prompt/completion boundary LlamaFactory and the scorer's default use), so the completion
    positions apply; a row without a solution is an error naming it.
    """
    from reasonlab.generate import GenOptions, render_prompts

    rows = list(df.iter_rows(named=True))[: max_texts or None]
    if solution:
        empty = [str(r["id"]) for r in rows if not (r.get("solution") or "").strip()]
        if empty:
            raise ActivationError(
                f"activations.prompt_sets.{set_name}: solution is true but {len(empty)} row(s) have "
                f"no reference solution (ids {', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}); "
                "fill the dataset's solution column or set solution: false"
            )
    prompts = render_prompts(rows, tokenizer, GenOptions(template=template, system=system))
    comps = (
        tokenizer([r["solution"] for r in rows], add_special_tokens=False)["input_ids"]
        if solution and rows
        else [[] for _ in rows]
    )
    out = []
    for r, p, c in zip(rows, prompts, comps, strict=True):
        ids = list(tokenizer(p, add_special_tokens=False)["input_ids"])
        level = r.get("level")
        labels = {"set": set_name, "type": r.get("type"), "correct": None,
                  "level": None if level is None else str(level)}  # fmt: skip
        out.append(Text(str(r["id"]), ids + list(c), len(ids), labels))
    return out


def generation_texts(df, set_name: str = "", max_texts: int | None = None) -> list[Text]:
    """Graded generations on their exact prompt and completion token ids, labelled by correctness."""
    multi = df["sample"].max() > 0 if df.height else False
    out = []
    for r in list(df.iter_rows(named=True))[: max_texts or None]:
        c = r.get("correct")
        level = r.get("level")
        labels = {"set": set_name, "level": None if level is None else str(level), "correct": c,
                  "type": None if c is None else ("correct" if c else "incorrect")}  # fmt: skip
        rid = f"{r['id']}#{r['sample']}" if multi else str(r["id"])
        prompt, completion = list(r["prompt_ids"]), list(r["token_ids"])
        out.append(Text(rid, prompt + completion, len(prompt), labels))
    return out


# ------------------------------------------------------------------------------ capture


class _Stop(Exception):
    """Raised by the deepest hook: the rest of the model (and its output head) is not needed."""


def forward_sites(model, parts: Parts, input_ids, attention_mask, layers: list[int]) -> dict:
    """One forward pass of the decoder up to the deepest requested layer; returns
    {layer: [batch, seq, hidden] residual} captured by forward hooks (the model is unmodified:
    the hooks are removed on exit, also on an error)."""
    import torch

    n = parts.n_layers
    got, handles = {}, []
    deepest = max(layers)

    def pre_hook(layer):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            got[layer] = hidden_of(x)
            if layer == deepest:
                raise _Stop

        return hook

    def final_hook(module, args, output):
        got[n] = hidden_of(output)
        raise _Stop

    try:
        for layer in layers:
            if layer < n:
                handles.append(parts.layers[layer].register_forward_pre_hook(
                    pre_hook(layer), with_kwargs=True))  # fmt: skip
            else:
                handles.append(parts.layers[n - 1].register_forward_hook(final_hook))
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        with torch.inference_mode(), contextlib.suppress(_Stop):
            model(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, use_cache=False)  # fmt: skip
    finally:
        for hd in handles:
            hd.remove()
    missing = [site_name(i, n) for i in layers if i not in got]
    if missing:
        raise ActivationError(f"the forward pass never reached the site(s) {missing}")
    return got


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def pad_batch(seqs: list[list[int]], pad: int, side: str, device):
    """(ids, attention mask, start column of each sequence) of token-id lists padded on `side`."""
    import torch

    width = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    starts = []
    for i, q in enumerate(seqs):
        s = width - len(q) if side == "left" else 0
        ids[i, s : s + len(q)] = torch.tensor(q)
        mask[i, s : s + len(q)] = 1
        starts.append(s)
    return ids.to(device), mask.to(device), starts


def batch_activations(model, parts: Parts, batch: list[Text], layers: list[int],
                      positions: list[Position], every_token: set[str], pad_id: int,
                      padding_side: str = "right", out_dtype=None) -> dict:  # fmt: skip
    """The activations of one batch: {position name: [texts, layers, (k,) hidden]} and, for
    `completion_all`, [completion tokens of the texts in `every_token`, layers, hidden] with
    per-text counts. Computed in float32 (means too), returned on the CPU in `out_dtype`."""
    import torch

    from reasonlab.models import input_device

    out_dtype = out_dtype or torch.float32
    dev = input_device(model)
    ids, mask, starts = pad_batch([t.ids for t in batch], pad_id, padding_side, dev)
    got = forward_sites(model, parts, ids, mask, layers)
    stacked = torch.stack([got[i] for i in layers], 1)  # [B, layers, seq, hidden]
    out = {}
    rows = torch.arange(len(batch), device=stacked.device)
    for p in positions:
        if p.rule == "last_prompt":
            idx = torch.tensor([s + t.n_prompt - 1 for s, t in zip(starts, batch, strict=True)],
                               device=stacked.device)  # fmt: skip
            out[p.name] = stacked[rows, :, idx].float()
        elif p.rule == "prompt_tail":
            idx = torch.tensor(
                [[s + t.n_prompt - p.k + j for j in range(p.k)] for s, t in zip(starts, batch, strict=True)],
                device=stacked.device,
            )  # fmt: skip
            out[p.name] = stacked[rows[:, None], :, idx].permute(0, 2, 1, 3).float()
        elif p.rule == "completion_mean":
            vecs = []
            for i, (s, t) in enumerate(zip(starts, batch, strict=True)):
                seg = stacked[i, :, s + t.n_prompt : s + len(t.ids)].float()
                vecs.append(
                    seg.mean(1)
                    if seg.shape[1]
                    else torch.full_like(stacked[i, :, 0], float("nan"), dtype=torch.float32)
                )
            out[p.name] = torch.stack(vecs)
        else:  # completion_all
            segs, counts = [], []
            for i, (s, t) in enumerate(zip(starts, batch, strict=True)):
                n_c = len(t.ids) - t.n_prompt if t.key in every_token else 0
                segs.append(
                    stacked[i, :, s + t.n_prompt : s + t.n_prompt + n_c].float().transpose(0, 1)
                )
                counts.append(n_c)
            out[p.name] = (
                torch.cat(segs) if segs else stacked.new_zeros((0, len(layers), stacked.shape[-1]))
            )
            out[p.name + ".counts"] = torch.tensor(counts)
    return {
        k: (v.to(out_dtype) if v.is_floating_point() else v).cpu().contiguous()
        for k, v in out.items()
    }


# ------------------------------------------------------------------------------ the store


def store_dir(store_root: str | Path, content_hash: str, dtype: str) -> Path:
    """The store directory of one checkpoint's content in one compute dtype."""
    return Path(store_root) / f"{content_hash[:24]}-{dtype}"


class StoreLock:
    """A short exclusive lock on a store directory: `mkdir` is atomic on local and network file
    systems (NFS too), unlike `flock`. A lock older than `stale_s` (its holder died while holding
    it: it is held for milliseconds) is broken."""

    def __init__(self, directory: Path, stale_s: float = 120.0, poll_s: float = 0.05):
        self.path = Path(directory) / "lock"
        self.stale_s, self.poll_s = stale_s, poll_s

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                self.path.mkdir()
                return self
            except FileExistsError:
                try:
                    if time.time() - self.path.stat().st_mtime > self.stale_s:
                        log.warning("breaking a stale store lock %s", self.path)
                        os.rmdir(self.path)
                        continue
                except FileNotFoundError:
                    continue
                time.sleep(self.poll_s)

    def __exit__(self, *exc):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(self.path)


@dataclass
class ShardInfo:
    """A finished shard: its texts in row order and what it holds."""

    name: str
    texts: list[str]
    layers: list[int]
    positions: list[str]
    every_token: list[str]  # texts with completion_all rows
    n_prompt: list[int]
    n_completion: list[int]


def _atomic_write(path: Path, data: bytes) -> None:
    from reasonlab.outputs import atomic

    with atomic(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class Store:
    """One checkpoint's (content hash, dtype) store directory."""

    def __init__(self, directory: str | Path, claim_stale_s: float = 1800.0):
        self.dir = Path(directory)
        self.shards_dir = self.dir / "shards"
        self.claims_dir = self.dir / "claims"
        self.claim_stale_s = claim_stale_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    # ---- reading
    def shards(self) -> list[ShardInfo]:
        out = []
        if self.shards_dir.is_dir():
            for meta in sorted(self.shards_dir.glob("*.json")):
                d = json.loads(meta.read_text())
                out.append(ShardInfo(meta.stem, d["texts"], d["layers"], d["positions"],
                                     d["every_token"], d["n_prompt"], d["n_completion"]))  # fmt: skip
        return out

    def find(self, texts: list[Text], layers: list[int], positions: list[Position],
             every_token: set[str]) -> dict[str, tuple[str, int]]:  # fmt: skip
        """text key -> (shard, row) for every text some finished shard holds with these layers and
        position rules (and every-token rows where asked)."""
        want = {p.name for p in positions}
        found: dict[str, tuple[str, int]] = {}
        for s in self.shards():
            if not (set(layers) <= set(s.layers) and want <= set(s.positions)):
                continue
            et = set(s.every_token)
            for row, key in enumerate(s.texts):
                if key not in found and (key not in every_token or key in et):
                    found[key] = (s.name, row)
        return found

    # ---- claims
    def _claims(self) -> dict[str, dict]:
        out = {}
        if self.claims_dir.is_dir():
            for f in self.claims_dir.glob("*.json"):
                try:
                    out[f.stem] = json.loads(f.read_text()) | {"mtime": f.stat().st_mtime}
                except (FileNotFoundError, json.JSONDecodeError):
                    continue
        return out

    def _stale(self, claim: dict) -> bool:
        if claim["host"] == self.owner["host"] and claim["pid"] != self.owner["pid"]:
            try:
                os.kill(claim["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return time.time() - claim["mtime"] > self.claim_stale_s

    def claim(self, keys: list[str], finished=None) -> tuple[str | None, set[str]]:
        """Under the lock: claim those of `keys` nobody is computing (stale claims are dropped)
        and no finished shard holds (`finished()`: the keys the shards hold, read under the lock
        after the claims, so a claim released after its shard was written is never missed).
        Returns (claim id or None, keys claimed by other live jobs)."""
        with StoreLock(self.dir):
            others: set[str] = set()
            for cid, c in self._claims().items():
                if self._stale(c):
                    log.warning("taking over a stale claim %s of %s", cid, c["host"])
                    (self.claims_dir / f"{cid}.json").unlink(missing_ok=True)
                else:
                    others |= set(c["texts"])
            done = finished() if finished else set()
            mine = [k for k in keys if k not in others and k not in done]
            if not mine:
                return None, others
            cid = uuid.uuid4().hex[:16]
            self.claims_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.claims_dir / f"{cid}.json",
                          json.dumps({**self.owner, "texts": mine}).encode())  # fmt: skip
            return cid, others

    def claimed(self, cid: str) -> list[str]:
        """The keys a claim of this job holds."""
        return json.loads((self.claims_dir / f"{cid}.json").read_text())["texts"]

    def refresh(self, cid: str) -> None:
        os.utime(self.claims_dir / f"{cid}.json")

    def release(self, cid: str | None) -> None:
        if cid:
            (self.claims_dir / f"{cid}.json").unlink(missing_ok=True)

    # ---- writing
    def write_shard(self, batch: list[Text], layers: list[int], positions: list[Position],
                    every_token: set[str], tensors: dict) -> str:  # fmt: skip
        """Write one batch's tensors, then its JSON (last: a shard without JSON is unfinished)."""
        from safetensors.torch import save

        self.shards_dir.mkdir(parents=True, exist_ok=True)
        name = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}"
        _atomic_write(self.shards_dir / f"{name}.safetensors", save(tensors))
        meta = {
            "version": STORE_VERSION,
            "texts": [t.key for t in batch],
            "layers": layers,
            "positions": [p.name for p in positions],
            "every_token": [t.key for t in batch if t.key in every_token],
            "n_prompt": [t.n_prompt for t in batch],
            "n_completion": [len(t.ids) - t.n_prompt for t in batch],
        }
        _atomic_write(self.shards_dir / f"{name}.json", json.dumps(meta).encode())
        return name


# ------------------------------------------------------------------------------ one job


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture job computes (every field but the `speed` ones changes results)."""

    layers: list[int] | str = "all"
    positions: list[str] = field(
        default_factory=lambda: ["last_prompt", "prompt_tail", "completion_mean"]
    )
    every_token_texts: int = 8  # completion_all: texts captured at every completion token
    max_store_gib: float = 20.0  # refuse an every-token capture that would exceed this
    store_dtype: str = "float32"  # float32 or bfloat16 on disk
    batch_size: int = speed(16)  # texts per forward pass
    padding_side: str = speed("right")  # right or left: the results are the same either way
    progress: bool = speed(True)


def _batches(texts: list[Text], size: int) -> list[list[Text]]:
    order = sorted(texts, key=lambda t: (-len(t.ids), t.key))
    return [order[i : i + size] for i in range(0, len(order), size)]


def capture(model, tokenizer, texts: list[Text], store: Store, opts: CaptureOptions,
            where: str = "", poll_s: float = 2.0) -> dict:  # fmt: skip
    """Make sure the store holds every text's activations; returns
    {"index": text key -> (shard, row), "computed": n, "reused": n, "layers", "positions", ...}.
    Peak memory is one batch's activations, whatever the number of texts."""
    import torch

    parts = decoder_parts(model)
    layers = check_layers(opts.layers, parts.n_layers)
    tail = post_instruction_tokens(tokenizer) if getattr(tokenizer, "chat_template", None) else 1
    positions = parse_positions(opts.positions, tail)
    has_completion = any(len(t.ids) > t.n_prompt for t in texts)
    positions = [p for p in positions if has_completion or not p.needs_completion]
    for p in positions:
        if p.rule == "prompt_tail":
            short = next((t for t in texts if t.n_prompt < p.k), None)
            if short:
                raise ActivationError(
                    f"activations.positions: {p.name} reaches past the prompt of text {short.id!r} "
                    f"({where}), which has {short.n_prompt} tokens; lower K"
                )
    unique = {t.key: t for t in texts}
    every_token = set()
    if any(p.rule == "completion_all" for p in positions):
        chosen = [t for t in texts if len(t.ids) > t.n_prompt][: opts.every_token_texts]
        every_token = {t.key for t in chosen}
        elem = 2 if opts.store_dtype == "bfloat16" else 4
        hidden = model.get_input_embeddings().weight.shape[1]
        gib = sum(len(t.ids) - t.n_prompt for t in chosen) * len(layers) * hidden * elem / 2**30
        if gib > opts.max_store_gib:
            raise ActivationError(
                f"activations.every_token_texts: every-token capture of {len(chosen)} texts would "
                f"write {gib:.1f} GiB ({where}), over activations.max_store_gib = "
                f"{opts.max_store_gib}; capture fewer texts or fewer layers, or raise the cap"
            )
    out_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(opts.store_dtype)
    if out_dtype is None:
        raise ActivationError(
            f"activations.store_dtype must be float32 or bfloat16, not {opts.store_dtype!r}"
        )
    pad = pad_id(tokenizer)
    computed = 0
    found = store.find(list(unique.values()), layers, positions, every_token)
    reused = len([k for k in unique if k in found])
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(unique) - reused, desc=f"capture {where}", unit="text")
    while True:
        missing = [k for k in unique if k not in found]
        if not missing:
            break
        cid, others = store.claim(
            missing, lambda: set(store.find(list(unique.values()), layers, positions, every_token))
        )
        try:
            mine = [] if cid is None else [unique[k] for k in store.claimed(cid)]
            for batch in _batches(mine, opts.batch_size):
                acts = batch_activations(model, parts, batch, layers, positions, every_token,
                                         pad, opts.padding_side, out_dtype)  # fmt: skip
                store.write_shard(batch, layers, positions, every_token, acts)
                computed += len(batch)
                if bar is not None:
                    bar.update(len(batch))
                if cid:
                    store.refresh(cid)
        finally:
            store.release(cid)
        found = store.find(list(unique.values()), layers, positions, every_token)
        if others and any(k not in found for k in others):
            time.sleep(poll_s)  # another job is computing them: wait, or take over when stale
    if bar is not None:
        bar.close()
    return {"index": found, "computed": computed, "reused": reused, "layers": layers,
            "positions": positions, "every_token": every_token, "n_layers": parts.n_layers}  # fmt: skip


# ------------------------------------------------------------------------------ reading back


def load(index, store: str | Path, position: str, layers: list[int] | None = None, rows=None):
    """The activations of an index table's texts (a polars frame or its Parquet path) at one
    position rule: a float32 numpy array [texts, layers, (k,) hidden] in the index's row order
    (for `completion_all`, a list of [tokens, layers, hidden] arrays, one per text with rows).
    Reads one shard at a time; memory is the result's size."""
    import numpy as np
    import polars as pl
    from safetensors import safe_open

    df = pl.read_parquet(index) if isinstance(index, str | Path) else index
    if rows is not None:
        df = df[rows]
    shards_dir = Path(store) / "shards"
    result: list = [None] * df.height
    for shard, grp in df.with_row_index("_i").group_by("shard", maintain_order=True):
        meta = json.loads((shards_dir / f"{shard[0]}.json").read_text())
        sel = [meta["layers"].index(i) for i in layers] if layers is not None else None
        path = shards_dir / f"{shard[0]}.safetensors"
        if not path.exists():
            raise ActivationError(f"store shard {path} is missing; re-run capture_activations")
        with safe_open(str(path), framework="pt") as f:
            if position == "completion_all":
                counts = f.get_tensor(position + ".counts").tolist()
                starts = np.cumsum([0, *counts])
                t = f.get_tensor(position).float().numpy()
                for i, row in zip(grp["_i"], grp["row"], strict=True):
                    a = t[starts[row] : starts[row + 1]]
                    result[i] = a[:, sel] if sel is not None else a
            else:
                t = f.get_tensor(position).float().numpy()
                for i, row in zip(grp["_i"], grp["row"], strict=True):
                    result[i] = t[row][sel] if sel is not None else t[row]
    if position == "completion_all":
        return result
    return np.stack(result) if result else np.zeros((0,))


def index_frame(texts: list[Text], found: dict):
    """The job's index table: one row per text with its labels and where its activations are."""
    import polars as pl

    rows = []
    for t in texts:
        shard, row = found[t.key]
        rows.append({"id": t.id, "set": t.labels.get("set"), "type": t.labels.get("type"),
                     "level": t.labels.get("level"), "correct": t.labels.get("correct"),
                     "text_key": t.key, "n_prompt": t.n_prompt, "n_completion": len(t.ids) - t.n_prompt,
                     "shard": shard, "row": row, "prompt_ids": t.ids[: t.n_prompt]})  # fmt: skip
    schema = {"id": pl.Utf8, "set": pl.Utf8, "type": pl.Utf8, "level": pl.Utf8,
              "correct": pl.Boolean, "text_key": pl.Utf8, "n_prompt": pl.Int64,
              "n_completion": pl.Int64, "shard": pl.Utf8, "row": pl.Int64,
              "prompt_ids": pl.List(pl.Int64)}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def capture_promptset(handle, texts_path: str, out_index: str, out_meta: str, store_root: str,
                      set_name: str, source: str = "dataset", options: dict | None = None,
                      template: str = "chat", system: str | None = None,
                      max_texts: int | None = None, threads: int | None = None, compute=None,
                      record_path=None, solution: bool = False) -> dict:  # fmt: skip
    """One `capture_activations` job: a prompt set (a prepared dataset's prompts, or a checkpoint's
    graded generations) under a model handle, into the store; writes the index table and the
    metadata JSON. Returns the metadata."""
    import polars as pl
    import torch

    from reasonlab import compute as cp
    from reasonlab.data import read_dataset
    from reasonlab.models import load_placed, read_handle

    if threads:
        torch.set_num_threads(threads)
    opts = CaptureOptions(**(options or {}))
    h = read_handle(handle)
    where = f"{h.model}/{h.ckpt} {set_name}"
    machine, placement, model, tok = load_placed(h, compute, where)
    if source == "generations":
        texts = generation_texts(pl.read_parquet(texts_path), set_name, max_texts)
    else:
        texts = dataset_texts(
            read_dataset(texts_path), tok, template, system, set_name, max_texts, solution
        )
    if not texts:
        raise ActivationError(
            f"activations.prompt_sets.{set_name}: {texts_path} has no texts ({where})"
        )
    sdir = store_dir(store_root, h.content_hash, placement.dtype)
    t0 = time.perf_counter()
    res = capture(model, tok, texts, Store(sdir), opts, where)
    seconds = time.perf_counter() - t0
    index = index_frame(texts, res["index"])
    set_hash = hashlib.sha256("".join(sorted(t.key for t in texts)).encode()).hexdigest()[:16]
    meta = {
        "model": h.model, "ckpt": h.ckpt, "content_hash": h.content_hash,
        "prompt_set": set_name, "source": source, "prompt_set_hash": set_hash,
        "template": template if source == "dataset" else "exact token ids",
        "completion": "generation" if source == "generations" else ("reference solution" if solution else None),
        "layers": res["layers"], "sites": [site_name(i, res["n_layers"]) for i in res["layers"]],
        "n_layers": res["n_layers"], "hidden_size": model.get_input_embeddings().weight.shape[1],
        "positions": [p.name for p in res["positions"]], "dtype": placement.dtype,
        "store_dtype": opts.store_dtype, "store": str(sdir), "texts": len(texts),
        "computed": res["computed"], "reused": res["reused"], "every_token_texts": len(res["every_token"]),
        "seconds": round(seconds, 2),
    }  # fmt: skip
    write_parquet(index, out_index)
    write_text(out_meta, json.dumps(meta, indent=2) + "\n")
    log.info("captured %s", {k: meta[k] for k in ("texts", "computed", "reused", "seconds")})
    rec = cp.record(placement, machine, "capture_activations", model=h.model, ckpt=h.ckpt,
                    promptset=set_name, seconds=meta["seconds"])  # fmt: skip
    cp.write_record(rec, record_path)
    return meta


def read_meta(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


__all__ = [
    "ActivationError", "CaptureOptions", "Parts", "Position", "Store", "Text", "capture",
    "capture_promptset", "check_layers", "dataset_texts", "decoder_parts", "forward_sites",
    "generation_texts", "index_frame", "load", "parse_positions", "post_instruction_tokens",
    "read_meta", "site_name", "store_dir",
]  # fmt: skip
