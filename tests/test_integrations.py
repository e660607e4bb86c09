"""ger_inductor.integrations.transformers: a transformers causal LM called with
``labels=`` returns no logits, so the fused lm head applies to the HF training path
(issue 14), with eager's loss and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ger_inductor
from benchmarks import zoo_models

try:
    zoo_models.import_torchvision()  # transformers imports it when it is there
except ImportError:
    pass
transformers = pytest.importorskip("transformers")

from ger_inductor.integrations.transformers import drop_logits_with_labels, restore  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("quiet_ger")]

V = 96


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:  # GPT-2: no loss_type, so transformers' loss_function logs a warning (a graph break)
        cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


def _step(model, fn, ids, labels):
    model.zero_grad(set_to_none=True)
    out = fn(input_ids=ids, labels=labels)
    out.loss.backward()
    return out, out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_labels_path_fuses_the_head_with_eager_numbers(kind):
    base = _model(kind)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    _, ref_loss, ref_grads = _step(base, base, ids, labels)

    model = drop_logits_with_labels(copy.deepcopy(base))
    compiled = torch.compile(model, backend="ger", options={"strict": True, "compiler": "aot_eager",
                                                             "lm_head_chunk": 8})
    breaks0 = sum(torch._dynamo.utils.counters["graph_break"].values())
    out, loss, grads = _step(model, compiled, ids, labels)
    assert out.logits is None and "logits" not in out
    fused = [m for r in ger_inductor.reports() for m in r.matches if m.family == "lm_head"]
    assert len(fused) == 1, [n.reason for r in ger_inductor.reports() for n in r.near_misses]
    # the hook runs inside the compiled graph (no graph break before it): the graph
    # returns no logits, so the fused op never writes them
    assert "logits" not in fused[0].detail, fused[0].detail
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    # without labels the output is the model's own; restore undoes the patch
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (2, 12, V)
    assert restore(model) is model and "forward" not in model.__dict__ and not hasattr(model, "_ger_drop_logits")
    with torch.no_grad():
        assert model(input_ids=ids, labels=labels).logits is not None
    assert getattr(model, "loss_type", None) == getattr(base, "loss_type", None)


def test_tuple_outputs_keep_their_positions_and_bad_input_is_refused():
    model = drop_logits_with_labels(_model("llama"))
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, return_dict=False)
    assert out[0].ndim == 0 and out[1] is None and len(out) >= 2
    assert drop_logits_with_labels(model) is model  # a second call is a no-op
    with pytest.raises(ValueError, match="takes no `labels` argument"):
        drop_logits_with_labels(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        drop_logits_with_labels(lambda x: x)
    with pytest.raises(ValueError, match="before torch.compile"):
        drop_logits_with_labels(torch.compile(_model("llama"), backend="ger"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_of_a_patched_model_gives_eager_tokens(kind):
    """transformers reads forward's signature (generate builds the attention mask and
    position ids, passes logits_to_keep, only for parameters it names): the patched
    forward keeps it. Before, left-padded prompts generated other tokens (stop-38 review)."""
    import inspect

    ref, pat = _model(kind).eval(), drop_logits_with_labels(_model(kind).eval())
    assert inspect.signature(pat.forward) == inspect.signature(ref.forward)
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = 0  # left padding
    for kw in (dict(input_ids=ids), dict(input_ids=ids, attention_mask=(ids != 0).long())):
        a = ref.generate(**kw, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = pat.generate(**kw, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(a, b), (a, b)


class _LossOnly(torch.nn.Module):
    """Takes ``labels`` but is no transformers causal LM: returns the loss tensor alone."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x, labels=None):
        z = self.lin(x)
        return z if labels is None else torch.nn.functional.cross_entropy(z, labels)


_Out = __import__("collections").namedtuple("_Out", "loss logits hidden")


class _NamedOut(_LossOnly):
    def forward(self, x, labels=None):
        z = self.lin(x)
        return _Out(torch.nn.functional.cross_entropy(z, labels), z, x)


def test_outputs_the_hook_does_not_know_are_left_as_the_module_gives_them():
    """A bare tensor output is returned as is (the hook raised AttributeError on it); a
    namedtuple keeps its type and fields with logits None (it became a plain tuple,
    without ``.loss``). Stop-36 review."""
    x, y = torch.randn(2, 4), torch.tensor([0, 2])
    bare = _LossOnly()
    own = bare(x, labels=y)
    torch.testing.assert_close(drop_logits_with_labels(bare)(x, labels=y), own)
    named = drop_logits_with_labels(_NamedOut())
    out = named(x, labels=y)
    assert type(out) is _Out and out.logits is None and out.hidden is x
    torch.testing.assert_close(out.loss, restore(named)(x, labels=y).loss)


def test_unmodified_labels_path_fuses_the_head_and_returns_the_logits():
    """No integration: Llama called with ``labels=`` returns its logits beside the loss;
    the fused op writes them as it forms them (eager's values), the loss and gradients
    are eager's, and a gradient into the returned logits reaches the model as in eager."""
    base = _model("llama")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    ref, ref_loss, ref_grads = _step(base, base, ids, labels)
    model = copy.deepcopy(base)
    compiled = torch.compile(model, backend="ger", options={"strict": True, "compiler": "aot_eager",
                                                             "lm_head_chunk": 8})
    out, loss, grads = _step(model, compiled, ids, labels)
    fused = [m for r in ger_inductor.reports() for m in r.matches if m.family == "lm_head"]
    assert [m.detail.get("logits") for m in fused] == ["written and returned"], \
        [n.reason for r in ger_inductor.reports() for n in r.near_misses]
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-6)
    assert out.logits.requires_grad
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
    # a loss on the returned logits as well (e.g. a z-loss computed outside the model)
    for m, f in ((base, base), (model, compiled)):
        m.zero_grad(set_to_none=True)
        o = f(input_ids=ids, labels=labels)
        (o.loss + 1e-3 * o.logits.float().logsumexp(-1).pow(2).mean()).backward()
    for (k, p), (_, p2) in zip(base.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_patched_model_deep_copies_and_pickles():
    """A deep copy of a patched model (an EMA or a reference model) runs its own weights
    and keeps the patch; ``torch.save(model)`` pickles it. The closure over the bound
    ``forward`` that the integration used before ran the original's weights in the copy
    and did not pickle (review, stop 35)."""
    import io

    model = drop_logits_with_labels(_model("llama"))
    ids = torch.randint(0, V, (1, 6))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        out = twin(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, torch.tensor(math.log(V)))  # zero weights: uniform predictions
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert loaded(input_ids=ids, labels=ids).logits is None
        assert loaded(input_ids=ids).logits is not None
