"""The editing methods factlens ships, registered by name (see :mod:`editing.editor`)."""

from __future__ import annotations

from editing.alphaedit import AlphaEditConfig, AlphaEditor
from editing.editor import Method, register
from editing.grace import GraceConfig, GraceEditor
from editing.memit import MemitConfig, apply_memit
from editing.rome import RomeConfig, apply_rome
from editing.subject_memory import SubjectMemoryConfig, SubjectMemoryEditor
from editing.weight_editor import WeightEditor
from editing.wise import WiseConfig, WiseEasyEditConfig, WiseEditor

register(Method(
    "memit", MemitConfig,
    create=lambda model, config: WeightEditor("memit", model, config, apply_memit),
    load=lambda path, model: WeightEditor.load("memit", path, model, MemitConfig(), apply_memit),
    lifelong=False, summary="MEMIT: mass editing of the critical MLP layers (weights change)"))
register(Method(
    "rome", RomeConfig,
    create=lambda model, config: WeightEditor("rome", model, config, apply_rome),
    load=lambda path, model: WeightEditor.load("rome", path, model, RomeConfig(), apply_rome),
    lifelong=False, summary="ROME: MEMIT's one-layer case at the peak of the critical band (weights change)"))
register(Method(
    "wise", WiseConfig,
    create=lambda model, config: WiseEditor(config).attach(model),
    load=lambda path, model: WiseEditor.load(path).attach(model),
    lifelong=True, summary="WISE: side memories behind an activation router (weights unchanged)"))
register(Method(
    "wise-easyedit", WiseEasyEditConfig,
    create=lambda model, config: WiseEditor(config).attach(model),
    load=lambda path, model: WiseEditor.load(path).attach(model),
    lifelong=True, summary="WISE as EasyEdit runs it: its margins, threshold and routing rule (a reference)"))
register(Method(
    "grace", GraceConfig,
    create=lambda model, config: GraceEditor(config).attach(model),
    load=lambda path, model: GraceEditor.load(path, model),
    lifelong=True, summary="GRACE: a key-value codebook at one layer (weights unchanged)"))
register(Method(
    "subject-memory", SubjectMemoryConfig,
    create=lambda model, config: SubjectMemoryEditor(config).attach(model),
    load=lambda path, model: SubjectMemoryEditor.load(path, model),
    lifelong=True, summary="Subject memory: MEMIT's target shifts in a codebook keyed at the subject (weights unchanged)"))
register(Method(
    "alphaedit", AlphaEditConfig,
    create=lambda model, config: AlphaEditor(model, config),
    load=lambda path, model: AlphaEditor.load(path, model),
    lifelong=True, summary="AlphaEdit: MEMIT projected onto the null space of preserved and earlier keys (weights change)"))
