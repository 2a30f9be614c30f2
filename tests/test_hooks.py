"""A forward nested in a hook (the subject memory's relation check) sees the plain model, and leaves the
enclosing forward's hooks, stop layer and captures as they were."""

import torch

from tracing.activations import activations_at
from tracing.adapter import ModelAdapter
from tracing.hooks import add_permanent_hooks, hooks_suspended, remove_hooks
from tracing.tokens import encode, right_padded

PROMPTS = ("The Eiffel Tower is located in", "Paris is the capital of", "The cat sat")


def test_a_forward_nested_in_a_hook_sees_no_hook_and_leaves_the_outer_one_intact(tiny_llama):
    rows = [encode(tiny_llama, p) for p in PROMPTS]
    plain_deep = activations_at(tiny_llama, rows[:2], ModelAdapter.resid_out(3), 4)
    plain_shallow = activations_at(tiny_llama, rows, ModelAdapter.resid_out(1), 2)
    calls = {"permanent": 0, "outer capture": 0}
    seen: dict[str, torch.Tensor] = {}

    def permanent(value, hook):
        calls["permanent"] += 1
        return value + 1.0  # would show in the nested forward's states if it ran there

    def nested(value, hook):
        with hooks_suspended(tiny_llama):
            seen["nested"] = activations_at(tiny_llama, rows[:2], ModelAdapter.resid_out(3), 4)

    def capture(value, hook):
        calls["outer capture"] += 1
        seen["outer"] = value.detach().clone()

    handles = add_permanent_hooks(tiny_llama, [(ModelAdapter.resid_out(0), permanent)])
    try:
        tiny_llama.run_with_hooks(right_padded(tiny_llama, rows), stop_at_layer=2,
                                  fwd_hooks=[(ModelAdapter.resid_out(0), nested),
                                             (ModelAdapter.resid_out(1), capture)])
        after = activations_at(tiny_llama, rows, ModelAdapter.resid_out(1), 2)
    finally:
        remove_hooks(handles)
    assert calls == {"permanent": 2, "outer capture": 1}  # the outer forward and the read after it, not nested
    assert torch.allclose(seen["nested"], plain_deep, atol=1e-6)  # no +1 from the permanent hook, full depth
    assert seen["outer"].shape == plain_shallow.shape
    assert torch.allclose(seen["outer"], after, atol=1e-6)  # the permanent hook still acts on the outer forward
    assert not torch.allclose(after, plain_shallow, atol=1e-3)
    assert all(getattr(block, "_stop_at_layer_idx", None) is None for block in tiny_llama.blocks)
