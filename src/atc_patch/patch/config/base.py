"""What every config shares: :class:`PatchConfig` (option checking, aliases, hints,
``settings``), the small validators of the options several kinds have, and :class:`PatchInfo`,
the record of a patch."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..._validate import as_int, check_options
from ...kernel import BACKENDS, LINKAGES

# Alternative spellings of an option, per kind: {given name: the config's field}.
ALIASES: dict[str, dict[str, str]] = {
    "vit": {"proportional_attn": "prop_attn"},
    "diffusion": {},
    "adapter": {"prop_attn": "proportional_attn"},
}

# Options of one kind that users bring to another: what to pass instead.
HINTS: dict[str, dict[str, str]] = {
    "vit": {
        "ratio": "a ViT is reduced by r (tokens removed per block) or keep_rate with "
        "reduction_loc; ratio is the diffusion models' option",
        "max_downsample": "max_downsample is a diffusion-model option",
        "blocks": "a ViT chooses blocks with keep_rate and reduction_loc",
        **{
            k: "sx/sy/st/use_rand/seed/generator belong to method='tome_sd' on diffusion models"
            for k in ("sx", "sy", "st", "use_rand", "seed", "generator")
        },
        "reduction_ratio": "reduction_ratio is the ViT-Adapter's option; a ViT takes keep_rate "
        "(with reduction_loc) or r",
        **{
            k: "tile/plan_scope/reuse_steps/merge are diffusion-model options"
            for k in ("tile", "plan_scope", "reuse_steps", "merge")
        },
    },
    "diffusion": {
        "r": "diffusion models take ratio (the fraction of each block's tokens removed), not r",
        "keep_rate": "diffusion models take ratio (the fraction of each block's tokens removed)",
        "reduction_loc": "diffusion models choose blocks with max_downsample (UNets) or "
        "blocks=[...] (diffusion transformers), not reduction_loc",
        "r_schedule": "diffusion models take one ratio for every patched block",
        "prop_attn": "proportional attention is a ViT option (diffusion patches unmerge after "
        "attention)",
        "trace_source": "trace_source is a ViT option",
    },
    "adapter": {
        "keep_rate": "a ViTAdapter takes reduction_ratio (the fraction of tokens kept at each "
        "reduction_loc), not keep_rate",
        "r": "a ViTAdapter takes reduction_ratio (the fraction of tokens kept at each "
        "reduction_loc), not r",
        "r_schedule": "a ViTAdapter reduces at reduction_loc by reduction_ratio",
        "trace_source": "a ViTAdapter has no trace_source; its features are unmerged to the grid",
        "ratio": "a ViTAdapter takes reduction_ratio (the fraction of tokens kept)",
    },
}


def _linkage(method: str, linkage: Any) -> str | None:
    """ATC's linkage (default ``"average"``); ``None`` for other methods, which reject one."""
    if method != "atc":
        if linkage is not None:
            raise ValueError(f"linkage applies to method='atc' only, not to {method!r}")
        return None
    linkage = "average" if linkage is None else linkage
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    return linkage


def _backend(method: str, backend: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and method != "atc":
        raise ValueError(f"backend='triton' applies to method='atc' only, not to {method!r}")
    return backend


def _method(kind: str, methods: tuple[str, ...], method: Any) -> str:
    if not isinstance(method, str) or method not in methods:
        raise ValueError(f"method must be one of {methods} for {kind}, got {method!r}")
    return method


def _optional_int(name: str, value: Any, minimum: int | None) -> int | None:
    return None if value is None else as_int(name, value, minimum=minimum)


@dataclass(frozen=True)
class PatchConfig:
    """What every config has: the kernel ``method`` and the kind of model it is for."""

    KIND: ClassVar[str] = ""
    WHAT: ClassVar[str] = ""  # for messages: "a ViT", "diffusion models", ...
    METHODS: ClassVar[tuple[str, ...]] = ()
    # Per method, the options it takes besides the common ones (None = every field).
    METHOD_ONLY: ClassVar[dict[str, tuple[str, ...]]] = {}

    method: str = "atc"

    @classmethod
    def options(cls, method: str) -> tuple[str, ...]:
        """The option names ``method`` accepts (keyword options of ``apply_patch``)."""
        own = {k for opts in cls.METHOD_ONLY.values() for k in opts}
        names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "method"]
        return tuple(n for n in names if n not in own or n in cls.METHOD_ONLY.get(method, ()))

    @classmethod
    def from_options(
        cls,
        method: str,
        options: Mapping[str, Any],
        where: str = "",
        unused: Mapping[str, str] | None = None,
    ) -> Any:
        """The config for ``apply_patch(model, method, **options)``.

        Aliases (:data:`ALIASES`) are resolved, ``None`` means "the default" for every
        option, and unknown options, options of another method and the options in ``unused``
        (``{name: hint}``, those the model's family has no use for) raise ``ValueError`` with
        the valid names and a hint (:data:`HINTS`).
        """
        unused = unused or {}
        method = _method(cls.WHAT, cls.METHODS, method)
        given = dict(options)
        for alias, name in ALIASES[cls.KIND].items():
            if alias in given:
                if name in given:
                    raise ValueError(f"give {name} or {alias} (the same option), not both")
                given[name] = given.pop(alias)
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in given.items() if v is not None or k not in fields}  # default
        hints = {**HINTS[cls.KIND], **unused}
        for other, names in cls.METHOD_ONLY.items():
            for name in names:
                if name not in cls.METHOD_ONLY.get(method, ()):
                    hints.setdefault(name, f"{name} applies to method={other!r} only")
        valid = [k for k in cls.options(method) if k not in unused]
        check_options(f"{where or cls.WHAT} with method={method!r}", given, valid, hints)
        return cls(method=method, **given)

    def check_unused(self, unused: Mapping[str, str], where: str = "") -> None:
        """Raise ``ValueError`` if an option in ``unused`` (``{name: hint}``) is not at its
        default (for a config built by the user and passed as ``config=``)."""
        for f in dataclasses.fields(self):
            if f.name in unused and f.init and getattr(self, f.name) != f.default:
                raise ValueError(
                    f"{f.name}={getattr(self, f.name)!r} has no use for {where or self.WHAT}: "
                    f"{unused[f.name]}"
                )

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def settings(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The values in use for :func:`~atc_patch.patch_settings`: the options ``method``
        accepts (defaults filled in), except ``exclude``."""
        return {n: getattr(self, n) for n in self.options(self.method) if n not in exclude}

    def _check_method_only(self) -> str:
        """Validate ``method`` and reject another method's option set to a non-default value
        (it would be ignored); returns ``method``."""
        method = _method(self.WHAT, self.METHODS, self.method)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for other, names in self.METHOD_ONLY.items():
            for name in names:
                mine = name in self.METHOD_ONLY.get(method, ())
                if not mine and getattr(self, name) not in (None, defaults[name]):
                    raise ValueError(f"{name} applies to method={other!r} only, not to {method!r}")
        return method

    def _set(self, **values: Any) -> None:  # for __post_init__ of a frozen dataclass
        for name, value in values.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class PatchInfo:
    """The record of a patch, kept on the patched root module only.

    Attributes:
        family: the family that patched it (``"timm"``, ``"unet"``, ...).
        config: the validated config in use.
        details: what the family reports beside the config (e.g. ``num_blocks``).
        state: per-patch objects the family keeps (e.g. the ``trace_source`` slot); never
            reported, not compared.
        unused: the config's options the family has no use for (left out of ``settings``).
    """

    family: str
    config: PatchConfig
    details: Mapping[str, Any] = field(default_factory=dict)
    state: Any = field(default=None, compare=False, repr=False)

    @property
    def method(self) -> str:
        return self.config.method

    unused: tuple[str, ...] = ()

    @property
    def settings(self) -> dict[str, Any]:
        """The config's values in use (without the options the family has no use for) plus
        the family's details."""
        return {**self.config.settings(self.unused), **self.details}
