"""The diffusion transformers the ``dit`` family patches, one table entry per class.

Grouped by how image and text meet: :mod:`.flux` (FLUX.1, FLUX.2, Chroma: double-stream then
single-stream blocks), :mod:`.mmdit` (SD3, QwenImage, CogView4, HiDream: two streams, one
joint attention), :mod:`.unified` (Z-Image: one ``[image, caption]`` sequence) and :mod:`.cross`
(PixArt, DiT, Sana: text through cross-attention or conditioning) and :mod:`.video` (Wan,
CogVideoX, LTX-Video, HunyuanVideo: a ``(t, h, w)`` token grid). The shape of an entry is in
:mod:`._table`.
"""

from ._table import Args, Blocks, Model
from .cross import MODELS as _CROSS
from .flux import MODELS as _FLUX
from .mmdit import MODELS as _MMDIT
from .unified import MODELS as _UNIFIED
from .video import MODELS as _VIDEO

MODELS: dict[str, Model] = {**_FLUX, **_MMDIT, **_UNIFIED, **_CROSS, **_VIDEO}

__all__ = ["MODELS", "Args", "Blocks", "Model"]
