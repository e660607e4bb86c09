"""transformers causal LMs: return no logits when labels are given, so the fused lm head
(the ``lm_head`` pass) applies to ``model(input_ids, labels=labels)``.

A transformers causal LM computes ``logits = lm_head(hidden)`` and, given ``labels``,
``loss = model.loss_function(logits, labels, ...)``, and returns both. Logits that leave
the compiled graph must be written out (N x V), and their gradient path kept: the head
cannot be fused with the loss. Most training loops read only ``outputs.loss`` when they
pass ``labels``; :func:`drop_logits_with_labels` makes such a model return
``logits=None`` then, and the head and loss compile into one chunked op that holds at
most one chunk of the logits (256 MiB by default). Where the logits fit in one chunk,
the saving is the integration's own: Inductor compiling the patched model is as lean
(docs/benchmarks.md, the model zoo).

It also sets ``model.loss_type = "ForCausalLM"`` where the model has none that
transformers recognises (GPT-2): otherwise ``model.loss_function`` logs a warning once
inside the forward, a graph break that separates the head from the loss.

>>> import transformers, torch
>>> from ger_inductor.integrations.transformers import drop_logits_with_labels, restore
>>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
...                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
>>> model = drop_logits_with_labels(transformers.AutoModelForCausalLM.from_config(cfg))
>>> ids = torch.randint(0, 64, (2, 8))
>>> out = model(ids, labels=ids)
>>> out.logits is None, out.loss.ndim
(True, 0)
>>> model(ids).logits.shape          # without labels: unchanged (generation, evaluation)
torch.Size([2, 8, 64])
>>> restore(model) is model
True
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

_PATCH = "_ger_drop_logits"  # marks a patched model; holds the instance's earlier ``forward`` attribute (or None)
_PARAMS = "_ger_forward_params"  # forward's parameter names (labels may come positionally)
_ORIGINAL_LOSS_TYPE = "_ger_original_loss_type"


def _known_loss_types() -> set:
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING
    except ImportError:  # an older layout: nothing to check against
        return {"ForCausalLM"}
    return set(LOSS_MAPPING)


def drop_logits_with_labels(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` (a transformers causal LM) return ``logits=None`` whenever it is
    called with ``labels``; calls without labels are unchanged. Sets the instance's
    ``forward`` to a small callable object (:class:`_ForwardWithoutLogits`: the class's
    forward, then the logits dropped), returns the model, and is undone by
    :func:`restore`; deep copies (an EMA or reference model: the copy's own weights) and
    pickles of the model keep it. Call it before ``torch.compile``: the logits are then
    dropped inside the compiled graph, which never returns them. (A forward hook would
    not do: ``torch.compile(model)`` compiles the forward and runs the module's hooks
    outside the graph, which then still returns the logits.)

    Code that reads ``outputs.logits`` of a call with labels (an evaluation loop computing
    accuracy, transformers' Trainer ``prediction_step``) must not use it: it raises no
    error there, the logits are ``None``, and the output holds one field fewer, so
    ``outputs[1]`` and ``outputs.to_tuple()`` shift (read fields by name). With
    ``return_dict=False`` the tuple keeps its positions, with ``None`` for the logits.
    Forward's signature is kept (``generate`` and the Trainer read it).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"drop_logits_with_labels: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
        raise ValueError("drop_logits_with_labels: got a compiled model (torch.compile's wrapper); apply it to the "
                         "model before torch.compile, or to `compiled._orig_mod`")
    if hasattr(model, _PATCH):
        return model  # already patched
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "labels" not in params:
        raise ValueError(f"drop_logits_with_labels: {type(model).__name__}.forward takes no `labels` argument; "
                         "expected a transformers causal LM (e.g. AutoModelForCausalLM)")
    if getattr(model, "_loss_function", None) is None and hasattr(type(model), "loss_function"):
        loss_type = getattr(model, "loss_type", None)
        if loss_type is None or loss_type not in _known_loss_types():
            setattr(model, _ORIGINAL_LOSS_TYPE, loss_type)
            model.loss_type = "ForCausalLM"
    setattr(model, _PARAMS, tuple(params))
    setattr(model, _PATCH, model.__dict__.get("forward"))
    model.forward = _ForwardWithoutLogits(model)
    return model


class _ForwardWithoutLogits:
    """A patched model's ``forward``: the forward it had (an earlier instance attribute,
    else its class's), then :func:`_drop_logits`. An object holding the model, not a
    closure over a bound method: ``copy.deepcopy`` of the model rebinds it to the copy,
    and ``torch.save(model)`` pickles it."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def __signature__(self) -> inspect.Signature:
        """The wrapped forward's: transformers reads it (``generate`` builds the attention
        mask and position ids, and passes ``logits_to_keep``, only for parameters forward
        names; the Trainer keeps a dataset's columns by it). Without it generation
        changed tokens on a patched model (stop-38 review)."""
        m = self.module
        inner = getattr(m, _PATCH, None)
        return inspect.signature(inner if inner is not None else type(m).forward.__get__(m))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        m = self.module
        inner = getattr(m, _PATCH, None)
        out = inner(*args, **kwargs) if inner is not None else type(m).forward(m, *args, **kwargs)
        return _drop_logits(m, args, kwargs, out)


def _drop_logits(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any):
    """The output without its logits when the call had labels."""
    names = getattr(module, _PARAMS, ())
    labels = kwargs.get("labels")
    if labels is None and "labels" in names and names.index("labels") < len(args):
        labels = args[names.index("labels")]
    if labels is None:
        return out
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a namedtuple: its own type, logits None
        return out._replace(logits=None) if "logits" in out._fields else out
    if type(out) is tuple:  # return_dict=False: (loss, logits, ...)
        return (out[0], None, *out[2:]) if len(out) >= 2 else out
    if isinstance(out, dict) and "logits" in out.keys():  # a ModelOutput (an OrderedDict); `callable` broke the graph
        # a new output without the logits (setting ``out.logits = None`` would leave them in
        # the output's dict, and so among the compiled graph's outputs)
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})
    return out  # an output this hook does not know (a tensor, ...): as the module gave it


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`drop_logits_with_labels` (a model it did not patch is returned as is)."""
    if hasattr(model, _PATCH):
        earlier = getattr(model, _PATCH)
        delattr(model, _PATCH)
        delattr(model, _PARAMS)
        if earlier is not None:
            model.forward = earlier
        else:
            model.__dict__.pop("forward", None)
    if hasattr(model, _ORIGINAL_LOSS_TYPE):
        old = getattr(model, _ORIGINAL_LOSS_TYPE)
        delattr(model, _ORIGINAL_LOSS_TYPE)
        model.loss_type = old
    return model
