"""The shape of a diffusion-transformer table entry, and the readers shared by entries.

A transformer class is a :class:`Model`: its block groups in execution order (a :class:`Blocks`
each: the ``ModuleList`` attribute, which sublayers follow the plan and how, where the block's
text is) and a reader that turns a root call's arguments into the call's
:class:`~..core.Call` (token grid, timestep, text length, where the generated image's tokens
are)::

    Model(
        (Blocks("transformer_blocks", _spans),),
        read=latent_call,                # grid (H / p, W / p) of latents (B, C, H, W)
    )
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...config import DiffusionConfig
from ..core import Call
from ..merge import Span

Spans = Callable[[DiffusionConfig], dict[str, Span]]


@dataclass(frozen=True)
class Args:
    """A root forward's parameter names (in order), to read its call's arguments by name, and
    the model's configuration."""

    names: tuple[str, ...]
    patch: int = 1  # the model's spatial patch size (latent pixels per token side)
    patch_t: int = 1  # a video model's temporal patch size (latent frames per token)
    config: Any = field(default=None, compare=False)  # the root's ``config``

    @classmethod
    def of(cls, root: nn.Module) -> Args:
        names = tuple(inspect.signature(type(root).forward).parameters)[1:]
        cfg = root.config
        size = getattr(cfg, "patch_size", 1) or 1
        if isinstance(size, (tuple, list)):  # Wan: (t, h, w)
            return cls(names, int(size[-1]), int(size[0]), cfg)
        return cls(names, int(size), int(getattr(cfg, "patch_size_t", 1) or 1), cfg)

    def get(self, args: tuple, kwargs: dict, name: str) -> Any:
        pos = self.names.index(name) if name in self.names else len(args)
        return args[pos] if pos < len(args) else kwargs.get(name)


@dataclass(frozen=True)
class Blocks:
    """One group of blocks of a transformer class.

    Attributes:
        attr: the ``ModuleList`` attribute holding the blocks.
        spans: ``config -> {sublayer attribute: Span}`` for the sublayers on merged tokens.
        text: where a block's text length comes from (:attr:`~..core.BlockSpec.text`).
        joint_input: the block's input is ``[text, image stream]`` (``BlockSpec.joint_input``).
        inner: the attribute of the real block inside each entry (HiDream's ``HiDreamBlock``
            wrappers hold it as ``.block``), or ``None``.
    """

    attr: str
    spans: Spans
    text: tuple[int, str] | str | None = None
    joint_input: bool = False
    inner: str | None = None

    def of(self, root: nn.Module) -> list[nn.Module]:
        blocks = list(getattr(root, self.attr, None) or ())
        return [getattr(b, self.inner) for b in blocks] if self.inner else blocks


Reader = Callable[[Args, tuple, dict], Call]


@dataclass(frozen=True)
class Model:
    """A transformer class: its block groups in execution order, its call reader, whether it
    has cross-attention to text (``merge_crossattn``: its queries), why its MLP cannot run
    on merged tokens (``no_mlp``) or its attention cannot merge keys and values (``no_kv``,
    ``merge="kv"``; ``None``: it can), and whether its token grid is a video's ``(t, h, w)``
    (``st`` and 3-D tiles) or an image's ``(h, w)``."""

    blocks: tuple[Blocks, ...]
    read: Reader
    cross_attention: bool = False
    no_mlp: str | None = None
    no_kv: str | None = None
    video: bool = False


# --------------------------------------------------------------------------------------------
# Readers: a root call's arguments -> its Call
# --------------------------------------------------------------------------------------------
def latent_call(
    where: Args, args: tuple, kwargs: dict, timestep: str = "timestep", text: str | None = None
) -> Call:
    """A call on latents ``hidden_states`` ``(B, C, H, W)``: the ``(H / p, W / p)`` grid of
    patches; the text length of argument ``text`` ``(B, T, C)``, if named."""
    x = where.get(args, kwargs, "hidden_states")
    hw = (int(x.shape[-2]) // where.patch, int(x.shape[-1]) // where.patch)
    return Call(
        functools.partial(fixed_grid, hw),
        where.get(args, kwargs, timestep),
        text=text_length(where, args, kwargs, text),
    )


def text_length(where: Args, args: tuple, kwargs: dict, name: str | None) -> int | None:
    """``T`` of the ``(B, T, C)`` argument ``name`` (``None``: no such argument)."""
    t = None if name is None else where.get(args, kwargs, name)
    return None if t is None else int(t.shape[1])


def fixed_grid(hw: tuple[int, ...], n: int, downsample: int) -> tuple[int, ...]:
    """``hw``, the ``(h, w)`` or ``(t, h, w)`` grid of this call's image tokens, which must be
    ``n`` tokens."""
    if math.prod(hw) != n:
        raise ValueError(
            f"method='tome_sd': the {n} image tokens of a block are not the "
            f"{'x'.join(map(str, hw))} grid of this call's latents"
        )
    return hw


def ids_grid(ids: Tensor | None, skip: int, n: int, downsample: int) -> tuple[int, int]:
    """``(h, w)`` of the ``n`` rows at ``skip`` of Flux's ``img_ids`` ``(S, k)`` / ``(1, S, k)``
    (rows, columns in columns 1 and 2), which must be one raster grid. Their values are read
    once per ``img_ids`` tensor (kept on it); where they cannot be read (``meta``,
    ``torch.compile``) the grid is the square one (``meta``: the most square factorisation;
    compiled: checked on the device)."""
    flat = ids[0] if ids is not None and ids.dim() == 3 else ids
    if flat is None or flat.dim() != 2 or flat.shape[0] < skip + n or flat.shape[1] < 3:
        raise ValueError(
            f"method='tome_sd' needs img_ids (N, 3) for the {n} image tokens to find their grid"
        )
    rows = flat[skip : skip + n]
    if ids.is_meta:
        return squarest(n)
    if torch.compiler.is_compiling():
        side = torch.sym_int(torch.sym_sqrt(n) + 0.5)  # also for a dynamic token count
        if side * side != n:
            raise ValueError(
                f"method='tome_sd' under torch.compile reads the grid from the token count "
                f"(img_ids cannot be read in a graph): {n} tokens are not a square grid; run "
                "eagerly or use another method"
            )
        torch._assert_async(is_raster(rows, side))
        return side, side
    return read_once(ids, "_atc_grid", (skip, n), lambda: raster_grid(rows, n))


def squarest(n: int) -> tuple[int, int]:
    """The most square ``h x w = n`` with ``h <= w``."""
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return h, n // h


def read_once(t: Tensor, attr: str, key: Any, read: Callable[[], Any]) -> Any:
    """``read()``, a host read of ``t``'s values for ``key``, kept on ``t`` until it changes in
    place."""
    cached = vars(t).get(attr)
    if cached is None or cached[0] != (t._version, key):
        cached = ((t._version, key), read())
        setattr(t, attr, cached)
    return cached[1]


def is_raster(ids: Tensor, w: int) -> Tensor:
    """A 0-d bool tensor: ``ids`` rows and columns number the tokens in raster order."""
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    rows, cols = rows - rows.min(), cols - cols.min()
    return (rows * w + cols == torch.arange(ids.shape[0], device=ids.device)).all()


def raster_grid(ids: Tensor, n: int) -> tuple[int, int]:
    cols = ids[:, 2].round().long()
    w = int(cols.max() - cols.min()) + 1
    if n % w or not bool(is_raster(ids, w)):
        raise ValueError(
            "method='tome_sd': img_ids are not one raster grid of image tokens (e.g. extra "
            "reference-image tokens); use another method, which needs no grid"
        )
    return n // w, w
