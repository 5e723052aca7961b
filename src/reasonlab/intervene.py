"""Interventions on the residual stream of unmodified Hugging Face models, as context managers that
register forward hooks on entry and remove them on exit, also on an exception.

Sites are numbered as in `reasonlab.activations`: layer l < L is the input of decoder layer l
(`resid_pre.l`), l = L the last layer's output before the final norm (`resid_final`).

- `InterventionHandler(model, direction, layers, strength, positions="all", norms=None)` (also
  `add_direction`): adds strength × direction to the residual stream at the given sites, in every
  forward pass inside the block — the prompt and, with a KV cache, each decode step (whose input
  is [batch, 1, hidden]; the hook fires once per step, counted in `.calls`). The strength is raw
  (× the direction as given), or, with `norms` ({site: mean residual norm on a reference set, see
  `mean_residual_norms`}), relative: the added vector is strength × norms[site] × the unit
  direction, so a sweep means the same at every layer and checkpoint.
- `DirectionAblator(model, direction)` (also `ablate_direction`): projects the direction out of
  every layer's input, every output a block writes into the residual stream (attention and MLP,
  or where the architecture normalises them before the residual add, their post-norms) and the
  last layer's output — refusal_direction's directional ablation.
- `LayerAblator(model, layers, method="zero" | "mean", means=None)`: removes decoder layer l's
  contribution (its output minus its input): "zero" passes the input through (the model without
  the layer), "mean" replaces the contribution by its mean over a reference set
  (`mean_contributions`).
- `PathPatcher(model, source, layers, positions)`: writes residuals recorded on a source run
  (`record_residuals`) into a target run at the given sites and positions. This is *activation
  patching* (the whole residual at a site is replaced; no path through specific heads is
  isolated), which seed 001 calls path patching.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from reasonlab import ReasonlabError
from reasonlab.activations import check_layers, decoder_parts, hidden_of, residual_writers

POSITIONS = ("all", "prompt", "generated")
log = logging.getLogger(__name__)


class InterventionError(ReasonlabError):
    """An intervention that cannot be applied as asked (width, layer, positions)."""


def _replace_hidden(output, new):
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


def _input_of(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_input(args, kwargs, new):
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _check_width(model, direction, what: str = "direction") -> None:
    hidden = model.get_input_embeddings().weight.shape[1]
    width = direction.shape[-1]
    if direction.ndim != 1 or width != hidden:
        raise InterventionError(
            f"a {what} of shape {tuple(direction.shape)} does not fit this model's residual stream "
            f"(hidden size {hidden}); use a direction chosen on a model of the same width"
        )


class _Hooks:
    """Register hooks on `__enter__`, remove every one on `__exit__` (also after an exception)."""

    def __init__(self, model):
        self.model = model
        self.parts = decoder_parts(model)
        self._handles: list = []

    def _register(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _site_pre(self, layer: int, pre, post):
        """Hook site `layer`: a pre-hook on decoder layer l, or a post-hook on the last layer (L)."""
        n = self.parts.n_layers
        if layer < n:
            self._handles.append(
                self.parts.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
            )
        else:
            self._handles.append(self.parts.layers[n - 1].register_forward_hook(post))

    def __enter__(self):
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc):
        self._remove()
        return False

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class InterventionHandler(_Hooks):
    """Steering: add `strength` × `direction` to the residual stream at `layers` (sites 0 … L).

    `positions`: "all" (every forward pass), "prompt" (passes over more than one token: the prompt,
    or a whole text without a cache) or "generated" (one-token passes: the decode steps of
    `generate` with a KV cache). `norms`: {site: mean residual norm} makes the strength relative.
    `.calls[site]` counts the forward passes the hook changed.
    """

    def __init__(self, model, direction, layers, strength: float = 1.0, positions: str = "all",
                 norms: dict | None = None):  # fmt: skip
        super().__init__(model)
        import torch

        _check_width(model, direction)
        if positions not in POSITIONS:
            raise InterventionError(
                f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}"
            )
        self.layers = check_layers(list(layers), self.parts.n_layers, "intervention layers")
        self.positions, self.strength = positions, float(strength)
        self.calls = dict.fromkeys(self.layers, 0)
        d = direction.detach().double()
        if norms is not None:
            missing = [layer for layer in self.layers if layer not in norms]
            if missing:
                raise InterventionError(
                    f"relative strength: no reference norm for site(s) {missing}"
                )
            unit = d / torch.linalg.vector_norm(d).clamp_min(1e-30)
            self.vectors = {
                layer: self.strength * float(norms[layer]) * unit for layer in self.layers
            }
        else:
            self.vectors = {layer: self.strength * d for layer in self.layers}
        self._cast: dict = {}

    def _vector(self, layer: int, x):
        key = (layer, x.device, x.dtype)
        if key not in self._cast:
            self._cast[key] = self.vectors[layer].to(x.device, x.dtype)
        return self._cast[key]

    def _applies(self, x) -> bool:
        if self.positions == "all":
            return True
        one = x.shape[-2] == 1
        return one if self.positions == "generated" else not one

    def _register(self) -> None:
        for layer in self.layers:

            def pre(module, args, kwargs, layer=layer):
                x = _input_of(args, kwargs)
                if not self._applies(x):
                    return None
                self.calls[layer] += 1
                return _with_input(args, kwargs, x + self._vector(layer, x))

            def post(module, args, output, layer=layer):
                x = hidden_of(output)
                if not self._applies(x):
                    return None
                self.calls[layer] += 1
                return _replace_hidden(output, x + self._vector(layer, x))

            self._site_pre(layer, pre, post)


class DirectionAblator(_Hooks):
    """Directional ablation: project `direction` out of the residual stream everywhere it is read
    or written (every layer's input, every attention and MLP output, the last layer's output)."""

    def __init__(self, model, direction):
        super().__init__(model)
        import torch

        _check_width(model, direction)
        d = direction.detach().double()
        norm = torch.linalg.vector_norm(d)
        self.unit = d / norm if norm > 0 else torch.zeros_like(d)
        self._cast: dict = {}

    def project(self, x):
        key = (x.device, x.dtype)
        if key not in self._cast:
            self._cast[key] = self.unit.to(x.device, x.dtype)
        u = self._cast[key]
        return x - (x @ u)[..., None] * u

    def _register(self) -> None:
        def pre(module, args, kwargs):
            return _with_input(args, kwargs, self.project(_input_of(args, kwargs)))

        def post(module, args, output):
            return _replace_hidden(output, self.project(hidden_of(output)))

        for block in self.parts.layers:
            self._handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            for writer in residual_writers(block):
                self._handles.append(writer.register_forward_hook(post))
        self._handles.append(self.parts.layers[self.parts.n_layers - 1].register_forward_hook(post))


class LayerAblator(_Hooks):
    """Remove decoder layers' contributions to the residual stream (output minus input).

    `method`: "zero" (the layer's output is its input: the model without the layer) or "mean" (the
    contribution is replaced by `means[layer]`, its mean over a reference set — see
    `mean_contributions`). `layers` are decoder layer indices 0 … L − 1.
    """

    def __init__(self, model, layers, method: str = "zero", means: dict | None = None):
        super().__init__(model)
        if method not in ("zero", "mean"):
            raise InterventionError(
                f"layer ablation method must be 'zero' or 'mean', not {method!r}"
            )
        n = self.parts.n_layers
        self.layers = check_layers(list(layers), n, "intervention layers")
        if n in self.layers:
            raise InterventionError(
                f"layer ablation: layer {n} is the last layer's output, not a layer; use 0 … {n - 1}"
            )
        if method == "mean":
            missing = [layer for layer in self.layers if means is None or layer not in means]
            if missing:
                raise InterventionError(
                    f"mean ablation: no mean contribution for layer(s) {missing}"
                )
            for layer in self.layers:
                _check_width(model, means[layer], f"mean contribution of layer {layer}")
        self.method, self.means = method, means or {}

    def _register(self) -> None:
        for layer in self.layers:

            def hook(module, args, kwargs, output, layer=layer):
                x = _input_of(args, kwargs)
                if self.method == "zero":
                    return _replace_hidden(output, x)
                m = self.means[layer].to(x.device, x.dtype)
                return _replace_hidden(output, x + m)

            self._handles.append(
                self.parts.layers[layer].register_forward_hook(hook, with_kwargs=True)
            )


class PathPatcher(_Hooks):
    """Activation patching: at sites `layers`, replace the residual at `positions` by
    `source[site]` ([batch, seq, hidden], recorded on the source run with `record_residuals`).

    `positions`: "all", a list of token indices (every row), or a boolean mask [batch, S] that
    patches row r at the positions where mask[r] is true (S ≤ the target's length: the source's
    first S positions are written; a source of batch 1 serves every row — one patched position
    per row is how `reasonlab.patching` sweeps positions in one batch). Forward passes shorter
    than the patched positions (decode steps) pass through unchanged; `.calls` counts the patched
    passes."""

    def __init__(self, model, source: dict, layers, positions="all"):
        super().__init__(model)
        self.layers = check_layers(list(layers), self.parts.n_layers, "patching layers")
        missing = [layer for layer in self.layers if layer not in source]
        if missing:
            raise InterventionError(
                f"path patching: the source has no residual at site(s) {missing}"
            )
        for layer in self.layers:
            _check_width(model, source[layer][0, 0], f"source residual at site {layer}")
        self.source, self.positions = source, positions
        self.calls = dict.fromkeys(self.layers, 0)
        self._mask = hasattr(positions, "dtype") and str(positions.dtype) == "torch.bool"
        if not self._mask and isinstance(positions, str) and positions != "all":
            raise InterventionError(f"path patching: positions {positions!r}: give \"all\", "
                                    "token indices or a boolean mask")  # fmt: skip

    def _patch(self, layer: int, x):
        src = self.source[layer]
        if x.shape[-2] == 1 and src.shape[-2] > 1:  # a decode step: nothing recorded to patch
            return None
        if src.shape[:2] != x.shape[:2]:
            raise InterventionError(
                f"path patching at site {layer}: the source residual is {tuple(src.shape[:2])} "
                f"(batch, tokens) but the target run is {tuple(x.shape[:2])}; patch runs of the "
                "same shape (pad the pair alike)"
            )
        self.calls[layer] += 1
        src = src.to(x.device, x.dtype)
        if isinstance(self.positions, str):  # "all"
            return src.clone()
        out = x.clone()
        out[:, self.positions] = src[:, self.positions]
        return out

    def _patch_mask(self, layer: int, x):
        import torch

        src, mask = self.source[layer], self.positions
        width = mask.shape[1]
        if x.shape[-2] == 1 and width > 1:  # a decode step
            return None
        if mask.shape[0] != x.shape[0] or x.shape[-2] < width or src.shape[-2] < width or \
                src.shape[0] not in (1, x.shape[0]):  # fmt: skip
            raise InterventionError(
                f"path patching at site {layer}: a mask of {tuple(mask.shape)} (rows, positions) "
                f"does not fit the target {tuple(x.shape[:2])} and source {tuple(src.shape[:2])}"
            )
        self.calls[layer] += 1
        m = mask.to(x.device)
        src = src[:, :width].to(x.device, x.dtype).expand(x.shape[0], -1, -1)
        out = x.clone()
        head = out[:, :width]
        out[:, :width] = torch.where(m.unsqueeze(-1), src, head)
        return out

    def _register(self) -> None:
        for layer in self.layers:
            patch = self._patch_mask if self._mask else self._patch

            def pre(module, args, kwargs, layer=layer, patch=patch):
                new = patch(layer, _input_of(args, kwargs))
                return None if new is None else _with_input(args, kwargs, new)

            def post(module, args, output, layer=layer, patch=patch):
                new = patch(layer, hidden_of(output))
                return None if new is None else _replace_hidden(output, new)

            self._site_pre(layer, pre, post)


add_direction = InterventionHandler
ablate_direction = DirectionAblator


# ------------------------------------------------------------------------------ references


def record_residuals(model, input_ids, attention_mask, layers) -> dict:
    """{site: [batch, seq, hidden]} residuals of one forward pass (a source run for `PathPatcher`),
    with the position ids `generate` and the scorer use under left padding."""
    from reasonlab.activations import forward_sites

    parts = decoder_parts(model)
    sites = check_layers(list(layers), parts.n_layers, "patching layers")
    return {
        k: v.clone()
        for k, v in forward_sites(model, parts, input_ids, attention_mask, sites).items()
    }


def _forward(model, input_ids, attention_mask):
    import torch

    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False)  # fmt: skip


def mean_residual_norms(model, batches, layers) -> dict:
    """{site: mean L2 norm of the residual over every unpadded token} on a reference set;
    `batches`: iterable of (input_ids, attention_mask). The scale of a relative strength."""
    import torch

    from reasonlab.activations import forward_sites

    parts = decoder_parts(model)
    sites = check_layers(list(layers), parts.n_layers, "intervention layers")
    total, count = dict.fromkeys(sites, 0.0), 0
    for input_ids, attention_mask in batches:
        got = forward_sites(model, parts, input_ids, attention_mask, sites)
        keep = attention_mask.bool()
        for s in sites:
            total[s] += float(torch.linalg.vector_norm(got[s][keep].double(), dim=-1).sum())
        count += int(keep.sum())
    if not count:
        raise InterventionError("mean residual norms: the reference set has no tokens")
    return {s: total[s] / count for s in sites}


def mean_contributions(model, batches, layers) -> dict:
    """{layer: [hidden] mean of the layer's output minus its input over every unpadded token} on a
    reference set (float64 sums) — what "mean" layer ablation writes in place of a contribution."""

    parts = decoder_parts(model)
    layers = check_layers(list(layers), parts.n_layers, "intervention layers")
    sums: dict = {}
    count = 0
    keep_mask: list = [None]
    handles = []

    def hook(module, args, kwargs, output, layer):
        delta = (hidden_of(output) - _input_of(args, kwargs))[keep_mask[0]].double().sum(0)
        sums[layer] = sums.get(layer, 0) + delta

    try:
        for layer in layers:
            if layer >= parts.n_layers:
                raise InterventionError(f"mean contributions: layer {layer} is not a decoder layer")
            handles.append(parts.layers[layer].register_forward_hook(
                lambda m, a, k, o, layer=layer: hook(m, a, k, o, layer), with_kwargs=True))  # fmt: skip
        for input_ids, attention_mask in batches:
            keep_mask[0] = attention_mask.bool()
            _forward(model, input_ids, attention_mask)
            count += int(keep_mask[0].sum())
    finally:
        for h in handles:
            h.remove()
    if not count:
        raise InterventionError("mean contributions: the reference set has no tokens")
    return {layer: (sums[layer] / count) for layer in layers}


def prompt_batches(model, tokenizer, prompts: list[str], batch_size: int = 16) -> list:
    """(input_ids, attention_mask) batches of rendered prompts, left-padded on the model's input
    device: the reference set of `mean_residual_norms` and `mean_contributions`."""
    from reasonlab.activations import pad_batch, pad_id
    from reasonlab.models import input_device

    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    dev = input_device(model)
    return [pad_batch(enc[i : i + batch_size], pad_id(tokenizer), "left", dev)[:2]
            for i in range(0, len(enc), batch_size)]  # fmt: skip


def mean_interval(values) -> tuple[float | None, float | None]:
    """The normal-approximation 95 % interval of a mean (nulls dropped; None under two values)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) < 2:
        return None, None
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean()) - half, float(v.mean()) + half


# ------------------------------------------------------------------------------ sweeps


def marker_ids(tokenizer, markers) -> list[int]:
    """The first token of each marker string (deduplicated, in order)."""
    out = []
    for m in markers:
        ids = tokenizer(m, add_special_tokens=False)["input_ids"]
        if ids and ids[0] not in out:
            out.append(ids[0])
    if not out:
        raise InterventionError(f"directions.markers: none of {list(markers)} encodes to a token")
    return out


def log_odds(logp, ids: list[int]) -> np.ndarray:
    """Per row: log(p / (1 - p)) of the markers' total probability p."""
    import torch

    lp = torch.logsumexp(logp[:, ids], -1).double()
    return (lp - torch.log1p(-lp.exp().clamp(max=1 - 1e-12))).numpy()


def kl_rows(base, other):
    """Per row KL(base || other) of two [rows, vocab] log-probability tensors, as a numpy array."""
    import torch

    b, o = base.double(), other.double()
    terms = torch.where(b > -math.inf, b.exp() * (b - o), torch.zeros((), dtype=b.dtype))
    return terms.sum(-1).clamp_min(0).numpy()


@dataclass(frozen=True)
class Setting:
    """One intervention setting of a sweep (the baseline has kind "baseline")."""

    name: str
    kind: str  # baseline | steer | ablate_direction | ablate_layer
    strength: float | None = None
    layers: tuple[int, ...] = ()
    method: str | None = None  # ablate_layer: zero | mean


def sweep_settings(kind: str, layers=(), strengths=(), methods=(), jointly: bool = False
                   ) -> list[Setting]:  # fmt: skip
    """The baseline, then one setting per strength (steer), the ablation (ablate_direction), or per
    method × layer (ablate_layer; `jointly`: per method, every listed layer at once)."""
    out = [Setting("baseline", "baseline")]
    layers = tuple(layers)
    if kind == "steer":
        out += [Setting(f"steer {s:+g}", kind, float(s), layers) for s in strengths]
    elif kind == "ablate_direction":
        out.append(Setting("ablate direction", kind))
    elif kind == "ablate_layer":
        groups = [layers] if jointly else [(layer,) for layer in layers]
        out += [
            Setting(f"{m} layers {','.join(map(str, g))}", kind, None, g, m)
            for m in methods
            for g in groups
        ]
    else:
        raise InterventionError(
            f"unknown intervention kind {kind!r}; expected steer, ablate_direction or ablate_layer"
        )
    return out


def setting_context(model, s: Setting, direction=None, norms=None, means=None):
    """The context manager that applies setting `s` (nothing for the baseline)."""
    import contextlib

    if s.kind == "steer":
        return InterventionHandler(model, direction, list(s.layers), s.strength, norms=norms)
    if s.kind == "ablate_direction":
        return DirectionAblator(model, direction)
    if s.kind == "ablate_layer":
        return LayerAblator(model, list(s.layers), s.method, means)
    return contextlib.nullcontext()


class _NonFinite(Exception):
    pass


def sweep(model, tokenizer, prompts: list[str], settings: list[Setting], opts, direction=None,
          norms=None, means=None, markers: list[int] | None = None,
          progress: bool = True) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Generate every prompt under every setting (batched transformers generation, `opts` a
    `GenOptions`). Returns (records: the generation schema plus `setting`, `kind`, `strength`,
    `layers`, `method`, `entropy_mean` — the mean entropy of the generated tokens under the
    distribution that produced them, as the scorer computes it — and `first_token_kl`, KL(baseline
    ‖ setting) of the first generated token's distribution, and with `markers` (token ids)
    `marker_logodds`, the log-odds of the first generated token being one of them; status rows: one
    per setting, "ok" or why it failed). A setting whose logits are not finite (a strength too large) is a failed
    status row and no records, never a crashed job."""
    import torch

    from reasonlab.generate import hf_generate
    from reasonlab.models import input_device
    from reasonlab.score import token_stats

    device = input_device(model)
    first: dict[str, list] = {}
    records, status = [], []
    it = settings
    if progress:
        from tqdm import tqdm

        it = tqdm(settings, desc="intervention settings", unit="setting")
    for s in it:
        firsts: list = []

        def extra(step_logits, new, lengths, firsts=firsts):
            for k, logits in enumerate(step_logits):
                if not torch.isfinite(logits).all():
                    raise _NonFinite(f"non-finite logits at generated token {k + 1}")
            ent = torch.zeros(new.shape[0], dtype=torch.float64)
            for k, logits in enumerate(step_logits):
                e = token_stats(logits, new[:, k].to(logits.device))["entropy"].double().cpu()
                ent += torch.where(torch.tensor(lengths) > k, e, torch.zeros_like(e))
            firsts.append(
                torch.log_softmax(step_logits[0].float(), -1).cpu() if step_logits else None
            )
            return [{"entropy_mean": float(ent[r] / max(n, 1))} for r, n in enumerate(lengths)]

        try:
            with setting_context(model, s, direction, norms, means):
                out = hf_generate(model, tokenizer, device, prompts, opts, extra=extra)
        except (_NonFinite, RuntimeError, ValueError) as e:
            status.append({"setting": s.name, "status": f"failed: {str(e).splitlines()[0][:200]}"})
            continue
        first[s.name] = torch.cat(firsts) if firsts and firsts[0] is not None else None
        status.append({"setting": s.name, "status": "ok"})
        base = first.get("baseline")
        kl = (
            kl_rows(base, first[s.name]) if base is not None and first[s.name] is not None
            else [None] * len(prompts) * opts.n
        )  # fmt: skip
        odds = (
            log_odds(first[s.name], markers) if markers and first[s.name] is not None
            else [None] * len(prompts) * opts.n
        )  # fmt: skip
        for i, samples in enumerate(out):
            for j, smp in enumerate(samples):
                r = i * opts.n + j
                records.append({**smp, "prompt_index": i, "sample": j, "setting": s.name,
                                "kind": s.kind, "strength": s.strength,
                                "layers": ",".join(map(str, s.layers)) or None, "method": s.method,
                                "first_token_kl": None if kl[r] is None else float(kl[r]),
                                "marker_logodds": None if odds[r] is None else float(odds[r])})  # fmt: skip
    return records, status


__all__ = [
    "DirectionAblator",
    "Setting",
    "InterventionError",
    "InterventionHandler",
    "LayerAblator",
    "PathPatcher",
    "ablate_direction",
    "kl_rows",
    "add_direction",
    "mean_contributions",
    "mean_residual_norms",
    "record_residuals",
    "setting_context",
    "sweep",
    "sweep_settings",
]


# ------------------------------------------------------------------------------ the job


def read_chosen_direction(chosen_path, pt_path, where: str = ""):
    """The chosen direction of a `directions` job ([hidden] float64 tensor, the raw difference of
    means) and its chosen.json, or (None, chosen) when no candidate passed the filters."""
    import json
    from pathlib import Path

    import torch

    info = json.loads(Path(chosen_path).read_text())
    chosen = info.get("chosen")
    if not chosen:
        return None, {"note": info.get("note", "no candidate passed the filters")}
    saved = torch.load(pt_path, map_location="cpu", weights_only=False)
    if not saved.get("chosen"):
        raise InterventionError(f"{pt_path}: no chosen direction saved ({where})")
    return torch.as_tensor(saved["chosen"]["direction"], dtype=torch.float64), chosen


def intervene_job(handle_path, data_path, spec_name: str, settings: dict, table_path,
                  status_path, chosen_path=None, pt_path=None, threads=None, compute=None,
                  record_path=None, progress: bool = True) -> dict:  # fmt: skip
    """One `intervene` job: a spec (kind, layers, strengths or methods) swept over a dataset's first
    `max_prompts` prompts under one checkpoint, the baseline in the same job; writes the graded
    generations with the setting columns (`table_path`) and one row per setting (`status_path`:
    accuracy with its Wilson interval, completion length, finish reasons, entropy, first-token KL,
    status)."""
    import time

    import polars as pl
    import torch

    from reasonlab import compute as cp
    from reasonlab.data import read_dataset
    from reasonlab.generate import GenOptions, render_prompts, to_frame
    from reasonlab.grading import grade_table, wilson
    from reasonlab.models import load_placed, read_handle

    if threads:
        torch.set_num_threads(threads)
    h = read_handle(handle_path)
    where = f"{h.model}/{h.ckpt} {spec_name}"
    key = f"interventions.specs.{spec_name}"
    data = read_dataset(data_path)
    if settings.get("max_prompts"):
        data = data.head(settings["max_prompts"])
    machine, placement, model, tok = load_placed(h, compute, where)
    opts = GenOptions(backend="transformers", template=settings.get("template") or "chat",
                      system=settings.get("system"), max_new_tokens=settings["max_new_tokens"],
                      logprobs=1, batch_size=settings.get("batch_size", 16))  # fmt: skip
    rows = data.to_dicts()
    prompts = render_prompts(rows, tok, opts)
    kind = settings["kind"]
    scale = settings.get("scale", "relative")
    direction, chosen, layers = None, {}, settings.get("layers") or []
    if kind in ("steer", "ablate_direction"):
        direction, chosen = read_chosen_direction(chosen_path, pt_path, where)
    if layers == "chosen":
        layers = [chosen["layer"]] if chosen.get("layer") is not None else []
    plan = sweep_settings(kind, layers, settings.get("strengths") or [],
                          settings.get("methods") or [], bool(settings.get("jointly")))  # fmt: skip
    t0 = time.perf_counter()
    norms = means = markers = None
    if kind != "ablate_layer" and direction is None:
        records = []
        status = [{"setting": s.name, "status": "failed: no direction was chosen for this "
                   f"checkpoint ({chosen.get('note', 'see chosen.json')})"} for s in plan]  # fmt: skip
        status[0]["status"] = "skipped"
    else:
        try:
            if kind == "ablate_layer" and "mean" in (settings.get("methods") or []):
                means = mean_contributions(model, prompt_batches(model, tok, prompts), layers)
            if kind == "steer" and settings.get("scale", "relative") == "relative":
                # the strengths are multiples of the mean residual norm on the swept prompts
                norms = mean_residual_norms(model, prompt_batches(model, tok, prompts), layers)
            if settings.get("markers"):
                markers = marker_ids(tok, settings["markers"])
            records, status = sweep(model, tok, prompts, plan, opts, direction=direction,
                                    norms=norms, means=means, markers=markers,
                                    progress=progress)  # fmt: skip
        except ReasonlabError as e:  # a direction of another width, a layer out of range
            raise InterventionError(f"{key}: {e} ({where})") from None
    seconds = time.perf_counter() - t0
    extra_cols = [
        "setting",
        "kind",
        "strength",
        "layers",
        "method",
        "entropy_mean",
        "first_token_kl",
        "marker_logodds",
    ]
    base = [{"id": rows[r["prompt_index"]]["id"], "prompt": prompts[r["prompt_index"]],
             "n_completion_tokens": len(r["token_ids"]), "backend": "transformers",
             "dtype": placement.dtype, **{k: v for k, v in r.items() if k not in extra_cols}}
            for r in records]  # fmt: skip
    raw = to_frame([{k: v for k, v in b.items() if k != "prompt_index"} for b in base])
    extra = pl.DataFrame([{k: r[k] for k in extra_cols} for r in records],
                         schema={"setting": pl.String, "kind": pl.String, "strength": pl.Float64,
                                 "layers": pl.String, "method": pl.String, "entropy_mean": pl.Float64,
                                 "first_token_kl": pl.Float64, "marker_logodds": pl.Float64})  # fmt: skip
    graded = grade_table(raw, data, settings.get("format") or "math")
    source = settings.get("source") or f"{h.model}/{h.ckpt}"  # whose direction (transfer)
    table = pl.concat([graded, extra], how="horizontal").with_columns(
        spec=pl.lit(spec_name), source=pl.lit(source)
    )
    order = {s.name: i for i, s in enumerate(plan)}
    by = {s.name: s for s in plan}
    summary = []
    for st in status:
        s = by[st["setting"]]
        part = table.filter(pl.col("setting") == s.name)
        n, k = part.height, int(part["correct"].fill_null(False).sum()) if part.height else 0
        lo, hi = wilson(k, n) if n else (None, None)
        t_lo, t_hi = mean_interval(part["n_completion_tokens"]) if n else (None, None)
        o_lo, o_hi = mean_interval(part["marker_logodds"]) if n else (None, None)
        summary.append({"spec": spec_name, "source": source, "scale": scale if s.kind == "steer" else None,
                        "setting": s.name, "order": order[s.name], "kind": s.kind,
                        "strength": s.strength, "layers": ",".join(map(str, s.layers)) or None,
                        "method": s.method, "status": st["status"], "n": n,
                        "accuracy": k / n if n else None, "ci_low": lo, "ci_high": hi,
                        "mean_tokens": part["n_completion_tokens"].mean() if n else None,
                        "tokens_ci_low": t_lo, "tokens_ci_high": t_hi,
                        "share_length": (part["finish_reason"] == "length").mean() if n else None,
                        "entropy_mean": part["entropy_mean"].mean() if n else None,
                        "first_token_kl": part["first_token_kl"].mean() if n else None,
                        "marker_logodds": part["marker_logodds"].mean() if n else None,
                        "logodds_ci_low": o_lo, "logodds_ci_high": o_hi,
                        "norm": None if norms is None else norms[s.layers[0]] if s.layers else None})  # fmt: skip
    table.write_parquet(table_path)
    pl.DataFrame(summary, infer_schema_length=None).write_parquet(status_path)
    rec = cp.record(placement, machine, "intervene", model=h.model, ckpt=h.ckpt, spec=spec_name,
                    seconds=round(seconds, 2))  # fmt: skip
    cp.write_record(rec, record_path)
    log.info(
        "interventions %s: %s", where, {s["setting"]: (s["status"], s["accuracy"]) for s in summary}
    )
    return {"settings": summary, "seconds": seconds}
