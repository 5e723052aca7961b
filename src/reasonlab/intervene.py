"""Interventions on the residual stream of unmodified Hugging Face models, as context managers that
remove their hooks on exit (also on an exception).

- `add_direction(model, direction, layers, strength)`: adds strength × direction to the residual
  stream at the given sites (the input of decoder layer l, or for l = L the last layer's output
  before the final norm), at every position of every forward pass inside the block (a prompt and,
  with a KV cache, each decode step).
- `ablate_direction(model, direction)`: projects the direction out of every layer's input, of
  every output a block writes into the residual stream (attention and MLP, or, where the
  architecture normalises them before the residual add, their post-norms), and of the last
  layer's output — refusal_direction's directional ablation.
"""

from __future__ import annotations

import contextlib

from reasonlab.activations import decoder_parts, hidden_of, residual_writers


def _replace_hidden(output, new):
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    return new


@contextlib.contextmanager
def add_direction(model, direction, layers: list[int], strength: float = 1.0):
    """Add `strength * direction` ([hidden], any norm: the raw difference of means, or a unit
    vector times a strength) to the residual stream at `layers` (0 … L)."""
    parts = decoder_parts(model)
    n = parts.n_layers
    handles = []

    def pre(module, args, kwargs):
        if args:
            x = args[0]
            return (x + (strength * direction).to(x.dtype).to(x.device), *args[1:]), kwargs
        x = kwargs["hidden_states"]
        return args, {
            **kwargs,
            "hidden_states": x + (strength * direction).to(x.dtype).to(x.device),
        }

    def post(module, args, output):
        x = hidden_of(output)
        return _replace_hidden(output, x + (strength * direction).to(x.dtype).to(x.device))

    try:
        for layer in layers:
            if layer < n:
                handles.append(parts.layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
            else:
                handles.append(parts.layers[n - 1].register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def ablate_direction(model, direction):
    """Project `direction` out of the residual stream everywhere it is read or written."""
    import torch

    parts = decoder_parts(model)
    norm = torch.linalg.vector_norm(direction.double())
    unit = direction / norm.to(direction.dtype) if norm > 0 else torch.zeros_like(direction)
    handles = []

    def project(x):
        u = unit.to(x.device, x.dtype)
        return x - (x @ u)[..., None] * u

    def pre(module, args, kwargs):
        if args:
            return (project(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": project(kwargs["hidden_states"])}

    def post(module, args, output):
        return _replace_hidden(output, project(hidden_of(output)))

    try:
        for block in parts.layers:
            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            for writer in residual_writers(block):
                handles.append(writer.register_forward_hook(post))
        handles.append(parts.layers[parts.n_layers - 1].register_forward_hook(post))
        yield
    finally:
        for h in handles:
            h.remove()
