"""The family contract, written once and run over the whole (family x method) table.

Every supported root class (see ``_cases.CASES``) with every method it takes:
the class and ``forward`` signature stay the library's own, ``remove_patch`` and zero reduction
are bit-identical to the unpatched model, re-applying replaces the settings, the config
round-trips, copies and pickles work, bad options and a failed apply leave the model exactly as
it was, the record is found through the root and what holds it, ``torch.compile(fullgraph=True)``
matches eager, and a ``meta`` forward gives the shapes.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

import atc_patch
from atc_patch.patch import (
    DiffusionConfig,
    ViTConfig,
    _override,
    find_family,
    patch_config,
    patch_settings,
)

from ._cases import TABLE, table_id

pytestmark = pytest.mark.usefixtures("one_thread")

# A valid value for each option a family may declare it has no use for (``UNUSED``).
SAMPLE_VALUES = {
    "unmerge": True,
    "max_downsample": 2,
    "blocks": (0,),
    "metric_dim": 4,
    "merge_crossattn": True,
}


@pytest.fixture(params=TABLE, ids=table_id)
def row(request):
    return request.param


def _patched(case, method, base=None):
    model = case.build()
    atc_patch.apply_patch(
        model, method, **case.options(method, case.reduce if base is None else base)
    )
    return model


def _private_attrs(model: torch.nn.Module) -> list[str]:
    return [f"{n}.{a}" for n, m in model.named_modules() for a in vars(m) if a.startswith("_atc")]


def _classes_and_signatures(model: torch.nn.Module) -> list[tuple[str, type, str]]:
    return [(n, type(m), str(inspect.signature(m.forward))) for n, m in model.named_modules()]


@torch.no_grad()
def test_classes_and_signatures_stay_the_librarys_own(row):
    case, method = row
    model = case.build()
    before = _classes_and_signatures(model)
    atc_patch.apply_patch(model, method, **case.options(method, case.reduce))
    assert _classes_and_signatures(model) == before
    assert len(_private_attrs(model)) <= 3 * len(list(model.modules()))


@torch.no_grad()
def test_remove_patch_is_bit_identical(row):
    case, method = row
    model = case.build()
    ref = case.run(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    atc_patch.apply_patch(model, method, **case.options(method, case.reduce))
    assert not torch.equal(case.run(model), ref), "the reducing options changed nothing"
    atc_patch.remove_patch(model)
    assert torch.equal(case.run(model), ref)
    assert patch_settings(model) is None
    assert _private_attrs(model) == []
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@torch.no_grad()
def test_zero_reduction_is_bit_identical(row):
    case, method = row
    model = case.build()
    ref = case.run(model)
    atc_patch.apply_patch(model, method, **case.options(method, case.zero))
    assert torch.equal(case.run(model), ref)


@torch.no_grad()
def test_reapply_replaces_the_settings(row):
    case, method = row
    model = _patched(case, method)
    atc_patch.apply_patch(model, method, **case.options(method, case.other))
    fresh = _patched(case, method, case.other)
    assert patch_settings(model) == patch_settings(fresh)
    assert torch.equal(case.run(model), case.run(fresh))


@torch.no_grad()
def test_settings_and_config_round_trip(row):
    case, method = row
    model = _patched(case, method)
    info = atc_patch.patch.find_patch_info(model)
    settings = patch_settings(model)
    assert settings["method"] == method and settings["family"] == case.family
    # The config itself, and the options it reports, give the same patch again.
    for again in (
        lambda m: atc_patch.apply_patch(m, config=patch_config(model)),
        lambda m: atc_patch.apply_patch(m, method, **info.config.settings(info.unused)),
    ):
        other = case.build()
        again(other)
        assert patch_settings(other) == settings
        assert patch_config(other) == patch_config(model)
        assert torch.equal(case.run(other), case.run(model))


@torch.no_grad()
def test_copies_and_pickles_stay_patched_and_removable(row):
    case, method = row
    ref = case.run(case.build())
    model = _patched(case, method)
    out = case.run(model)
    for dup in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert patch_settings(dup) == patch_settings(model)
        assert torch.equal(case.run(dup), out)
        atc_patch.remove_patch(dup)
        assert torch.equal(case.run(dup), ref)
        assert _private_attrs(dup) == []
    assert torch.equal(case.run(model), out)  # the original is untouched by its copies


def test_unknown_option_is_a_value_error_and_changes_nothing(row):
    case, method = row
    model = case.build()
    with pytest.raises(ValueError, match="valid options"):
        atc_patch.apply_patch(model, method, **case.options(method, case.reduce), bogus=1)
    assert patch_settings(model) is None and _private_attrs(model) == []


def test_options_the_family_has_no_use_for_are_rejected(row):
    case, method = row
    fam, _ = find_family(case.build())
    for name in getattr(fam, "UNUSED", {}):
        model = case.build()
        with pytest.raises(ValueError, match=name):
            atc_patch.apply_patch(
                model, method, **case.options(method, case.reduce), **{name: SAMPLE_VALUES[name]}
            )
        assert patch_settings(model) is None and _private_attrs(model) == []


@torch.no_grad()
def test_a_failed_apply_leaves_the_model_as_it_was(row, monkeypatch):
    case, method = row
    model = case.build()
    ref = case.run(model)
    # Rejected by the model itself (a block past the last one): nothing is touched.
    with pytest.raises(ValueError):
        atc_patch.apply_patch(model, method, **case.options(method, case.bad_at_apply))
    assert patch_settings(model) is None and _private_attrs(model) == []
    assert torch.equal(case.run(model), ref)
    # Already patched: the old settings stay in force.
    atc_patch.apply_patch(model, method, **case.options(method, case.reduce))
    settings, out = patch_settings(model), case.run(model)
    with pytest.raises(ValueError):
        atc_patch.apply_patch(model, method, **case.options(method, case.bad_at_apply))
    assert patch_settings(model) == settings
    assert torch.equal(case.run(model), out)
    # A failure midway (the second module the family touches): restored exactly.
    atc_patch.remove_patch(model)
    calls = {"n": 0}
    real = _override._saved

    def failing(module):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real(module)

    monkeypatch.setattr(_override, "_saved", failing)
    with pytest.raises(RuntimeError, match="injected"):
        atc_patch.apply_patch(model, method, **case.options(method, case.reduce))
    monkeypatch.undo()
    assert calls["n"] >= 2, "the family does not patch through _override"
    assert patch_settings(model) is None and _private_attrs(model) == []
    assert torch.equal(case.run(model), ref)


@torch.no_grad()
def test_the_record_is_found_through_either_object(row):
    case, method = row
    if case.holder is None:
        pytest.skip(f"{case.name}: no holder class (the model is its own root)")
    options = case.options(method, case.reduce)
    root = case.build()
    ref = case.run(root)
    holder = case.holder(root)
    atc_patch.apply_patch(holder, method, **options)
    assert patch_settings(root) == patch_settings(holder) is not None
    out = case.run(root)
    atc_patch.apply_patch(root, method, **options)  # re-patching through the root: no error
    assert torch.equal(case.run(root), out)
    atc_patch.remove_patch(root)
    assert patch_settings(holder) is None
    atc_patch.apply_patch(root, method, **options)
    atc_patch.remove_patch(holder)
    assert patch_settings(root) is None and _private_attrs(root) == []
    assert torch.equal(case.run(root), ref)


def _unless_the_model_itself_cannot(case, what: str) -> None:
    if what in case.model_cannot:
        pytest.skip(f"the unpatched {case.name} cannot {what} either: {case.model_cannot[what]}")


@torch.no_grad()
def test_fullgraph_compile_matches_eager(row):
    case, method = row
    _unless_the_model_itself_cannot(case, "compile")
    model = _patched(case, method)
    eager = case.run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(case.run(compiled), eager, rtol=1e-5, atol=1e-5)


# Inductor on a sample of the table: one row per method, families spread over the rows.
INDUCTOR_SAMPLE = (
    "torchvision-tome",
    "transformers-vit-kmedoids",
    "transformers-dinov3-atc",
    "tiny-flux-dpcknn",
    "tiny-sd3-tome_sd",
)


@pytest.mark.parametrize("row", [r for r in TABLE if table_id(r) in INDUCTOR_SAMPLE], ids=table_id)
@torch.no_grad()
def test_inductor_compile_matches_eager_on_a_sample(row):
    case, method = row
    model = _patched(case, method)
    eager = case.run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(case.run(compiled), eager, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_meta_forward_gives_the_shapes(row):
    case, method = row
    _unless_the_model_itself_cannot(case, "meta")
    model = _patched(case, method)
    shape = case.run(model).shape
    meta = copy.deepcopy(model).to("meta")
    out = case.run(meta, "meta")
    assert out.device.type == "meta" and out.shape == shape


def test_an_unsupported_model_is_a_type_error():
    with pytest.raises(TypeError, match="supported"):
        atc_patch.apply_patch(torch.nn.Linear(2, 2), "atc", r=1)


def test_a_config_of_another_kind_is_rejected():
    case = next(c for c, _ in TABLE if c.family == "timm")
    model = case.build()
    with pytest.raises(ValueError, match="ViTConfig"):
        atc_patch.apply_patch(model, config=DiffusionConfig())
    with pytest.raises(ValueError, match="not both"):
        atc_patch.apply_patch(model, config=ViTConfig(r=2), r=3)
    assert patch_settings(model) is None
