"""torch.export checks for test_vit_interop, run in a fresh process.

torch.export leaves the autograd engine in a state where a later backward in a process forked
from this one fails ("Unable to handle autograd's threading in combination with fork-based
multiprocessing"), which would break the fork-based DDP tests run in the same pytest process.
Prints one line per check: ``<family> <check> ok`` or ``<family> <check> FAIL <reason>``.
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_vit_interop import BUILDERS, images  # noqa: E402

import atc_patch  # noqa: E402


def main() -> None:
    x = images()
    for family, build in BUILDERS.items():
        model = build(2)
        atc_patch.apply_patch(model, method="atc", r=4)
        try:
            torch.export.export(model, (x,))
            print(family, "refused FAIL exported")
        except RuntimeError as e:
            ok = "torch.export is not supported" in str(e)
            print(family, "refused", "ok" if ok else f"FAIL {e}")
        atc_patch.apply_patch(model, method="atc", r=0)
        with torch.no_grad():
            ref = model(x)
        got = torch.export.export(model, (x,)).module()(x)
        print(family, "identity", "ok" if torch.allclose(got, ref, atol=1e-5) else "FAIL differ")


if __name__ == "__main__":
    main()
