"""Keeping an edited subject's other facts: the templates drawn for it, and MEMIT's target optimisation
holding their answers when asked to (``compute_targets(..., keep_templates=...)``)."""

import torch

from editing.memit import current_outputs
from editing.other_relations import other_relation_templates
from editing.prompts import subject_row
from editing.targets import TargetConfig, compute_targets
from tracing.adapter import ModelAdapter
from tracing.facts import Fact

TEMPLATES = {"capital": ("The capital of {} is",), "currency": ("The currency of {} is the", "{} pays with the"),
             "language": ("In {}, people speak",), "river": ("The river through {} is the",)}
SUBJECTS = {"capital": ("Atlantis", "Lemuria"), "currency": ("Atlantis",), "language": ("Lemuria",),
            "river": ("Springfield",)}


def test_templates_skip_the_edited_relations_and_put_relations_of_the_same_kind_of_subject_first():
    edit = Fact("Atlantis", "The capital of {} is", "Poseidonia", "Rome", relation="capital")
    earlier = [Fact("Atlantis", "In {}, people speak", "Greek", "Latin", relation="language")]
    (drawn,) = other_relation_templates([edit], earlier, 3, templates=TEMPLATES, subjects=SUBJECTS)
    assert set(drawn[:2]) == {"The currency of {} is the", "{} pays with the"}  # kin: shares a subject
    assert drawn[2:] == ["The river through {} is the"]  # then the rest; never capital or language
    again = other_relation_templates([edit], earlier, 3, templates=TEMPLATES, subjects=SUBJECTS)
    assert again == [drawn]  # reproducible
    assert other_relation_templates([edit], [], 0, templates=TEMPLATES, subjects=SUBJECTS) == [[]]


def test_keep_templates_hold_the_answers_of_the_subjects_other_relations(tiny_llama):
    model, layer = tiny_llama, 1
    fact = Fact("Atlantis", "The capital of {} is", "Paris", "Rome")
    keep = "The currency of {} is the"
    config = TargetConfig(steps=20, loss_threshold=0.0, keep_factor=10.0, kl_factor=0.0)
    h = current_outputs(model, [fact], layer)[0]
    row = subject_row(model, keep, fact.subject)

    def keep_distribution(shift: torch.Tensor) -> torch.Tensor:
        def add(value, hook):
            value[:, row.lookup] += shift.to(value.dtype)
            return value

        with torch.no_grad():
            logits = model.run_with_hooks(torch.tensor([row.ids]),
                                          fwd_hooks=[(ModelAdapter.resid_out(layer), add)])[0, -1]
        return torch.log_softmax(logits.float(), -1)

    before = keep_distribution(torch.zeros_like(h))
    moved = {}
    for name, templates in (("free", None), ("kept", [[keep]])):
        z = compute_targets(model, [fact], layer, [["{}"]], config, show_progress=False, keep_templates=templates)
        after = keep_distribution(z[0] - h)
        moved[name] = float((after.exp() * (after - before)).sum())  # KL(after || before)
    assert moved["kept"] < 0.5 * moved["free"]
