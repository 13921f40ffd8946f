"""The diffusion patches with ``tile=None, plan_scope="block", reuse_steps=1, merge="tokens"``
(the defaults) give, bit for bit, the outputs they gave before those options existed.

``diffusion_reference_outputs.json`` holds, per case, the SHA-256 of the float32 output of one
patched call (and of the unpatched call, ``"unpatched-<kind>"``), computed by this module's
:func:`reference` on commit 5fb7067 (``PYTHONPATH=<its src> python
tests/patch/test_diffusion_reference_outputs.py > tests/patch/diffusion_reference_outputs.json``).
A float output is bit-exact only on the same torch build and CPU kernels: where the unpatched
model's own output differs from the stored one, the cases are skipped (nothing to compare).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import atc_patch
from atc_patch.testing import build_transformer, build_unet, transformer_inputs, unet_inputs

STORED = Path(__file__).with_name("diffusion_reference_outputs.json")
KINDS = ("tiny-sd", "tiny-sdxl", "tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit")
METHODS = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")


def options() -> Iterator[tuple[str, str, dict]]:
    """``(name, method, options)`` of the patched cases of every kind."""
    for method in METHODS:
        seed = {"seed": 3} if method == "tome_sd" else {}
        yield method, method, {"ratio": 0.5, **seed}
        yield f"{method}-mlp", method, {"ratio": 0.4, "merge_mlp": True, **seed}
    for linkage in ("single", "complete"):
        yield f"atc-{linkage}", "atc", {"ratio": 0.5, "linkage": linkage, "merge_mlp": True}
    yield "atc-metric_dim", "atc", {"ratio": 0.5, "metric_dim": 4}
    yield "tome_sd-norand", "tome_sd", {"ratio": 0.5, "use_rand": False}


def model_and_inputs(kind: str) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    if kind in ("tiny-sd", "tiny-sdxl"):
        model = build_unet(kind)
        return model, unet_inputs(model, batch=2, height=16, width=16)
    model = build_transformer(kind)
    return model, transformer_inputs(model, batch=2, height=8, width=8)


def _sha(out: torch.Tensor) -> str:
    return hashlib.sha256(out.detach().contiguous().numpy().astype("<f4").tobytes()).hexdigest()


@torch.no_grad()
def outputs(kind: str) -> dict[str, str]:
    """``{case name: SHA-256 of its output}`` for one kind (``"unpatched-<kind>"`` first)."""
    model, inputs = model_and_inputs(kind)
    out = {f"unpatched-{kind}": _sha(model(**inputs).sample)}
    for name, method, opts in options():
        atc_patch.apply_patch(model, method, **opts)
        out[f"{name}-{kind}"] = _sha(model(**inputs).sample)
        atc_patch.remove_patch(model)
    return out


def reference() -> dict[str, str]:
    return {k: v for kind in KINDS for k, v in outputs(kind).items()}


@pytest.fixture(scope="module")
def stored() -> dict[str, str]:
    return json.loads(STORED.read_text())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", KINDS)
def test_default_options_give_the_stored_outputs(stored: dict, kind: str) -> None:
    got = outputs(kind)
    if got[f"unpatched-{kind}"] != stored[f"unpatched-{kind}"]:
        pytest.skip("the unpatched model's output differs on this torch build / CPU")
    assert {k for k in stored if k.endswith(kind)} == set(got)
    assert [k for k, v in got.items() if v != stored[k]] == []


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the test (one_thread)
    json.dump(reference(), sys.stdout, indent=1, sort_keys=True)
    print()
