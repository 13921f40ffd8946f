"""The video diffusion transformers (tiny, random init from their real configurations, CPU).

What the contract test does not cover: the ``(t, h, w)`` token grid read from the latents
(``tome_sd``'s ``st x sy x sx`` windows against their definition, ``(tt, th, tw)`` tiles
against scipy per tile, frames kept apart), rotary tables that follow the plan, conditioning
frames that never merge, the 3-D options refused where they cannot apply, and a pipeline
holding two transformers (Wan 2.2 A14B).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import same_partition
from kernel.test_atc import scipy_cuts
from kernel.test_tiles import tile_rs, tiles_of, tome_sd_reference
from torch.overrides import TorchFunctionMode

import atc_patch
from atc_patch.kernel import cluster_tokens
from atc_patch.patch.diffusion import core
from atc_patch.patch.diffusion.dit import transformer_blocks
from atc_patch.testing import build_transformer, transformer_inputs

from ._models import model_of
from .test_diffusion_dit_image import recording, sdpa_calls

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO = ("tiny-wan", "tiny-cogvideox", "tiny-ltx", "tiny-hunyuanvideo")


def inputs_of(model, frames: int = 3, h: int = 4, w: int = 6, **kw) -> dict:
    return transformer_inputs(model, batch=2, height=h, width=w, frames=frames, **kw)


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


@contextlib.contextmanager
def plans(monkeypatch):
    """Record every plan the patched blocks make (``None``: the block ran unmerged)."""
    made: list = []
    real = core.block_plan

    def record(active):
        first = not active.planned
        plan = real(active)
        if first:
            made.append((active.x, plan))
        return plan

    monkeypatch.setattr(core, "block_plan", record)
    yield made


def _first_block_input(model, inputs) -> torch.Tensor:
    return _block_input(model, transformer_blocks(model)[0], inputs)


def _block_input(model, block, inputs) -> torch.Tensor:
    store: list = []
    handle = block.register_forward_pre_hook(
        lambda m, a, kw: store.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    try:
        run(model, inputs)
    finally:
        handle.remove()
    return store[0]


# ---------------------------------------------------------------------------------------------
# the (t, h, w) grid: tome_sd windows, tiles, frames kept apart
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", VIDEO)
@pytest.mark.parametrize("window", [(1, 2, 2), (2, 2, 2), (3, 2, 3)])
def test_tome_sd_3d_windows_match_their_definition(kind, window, monkeypatch):
    """``tome_sd`` with ``st x sy x sx`` windows on a 3 x 4 x 6 video grid: the plan of a
    block is ToMe-SD's partition of its input tokens over the ``(t, h, w)`` grid, with the
    destinations drawn from the generator as tomesd draws them."""
    model = model_of(kind)
    inputs = inputs_of(model)
    st, sy, sx = window
    atc_patch.apply_patch(
        model, "tome_sd", ratio=0.5, st=st, sy=sy, sx=sx, blocks=[0],
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    with plans(monkeypatch) as made:
        run(model, inputs)
    ((x, plan),) = made
    n = 3 * 4 * 6
    for i in range(2):
        ref = tome_sd_reference(x[i], n // 2, (3, 4, 6), window, torch.Generator().manual_seed(3))
        assert same_partition(plan.labels[i], ref), window
    windows = math.prod(g // s for g, s in zip((3, 4, 6), window))
    assert plan.num_out == n - min(n // 2, n - windows)


@pytest.mark.parametrize("kind", VIDEO)
@pytest.mark.parametrize("tile", [(1, 4, 6), (2, 2, 4), (3, 3, 3)])
def test_3d_tiles_match_scipy_per_tile(kind, tile, monkeypatch):
    """ATC with ``(tt, th, tw)`` tiles on the 3 x 4 x 6 grid: no cluster spans two tiles and
    each tile's partition is scipy's for that tile's tokens (average linkage)."""
    model = model_of(kind)
    atc_patch.apply_patch(model, "atc", ratio=0.5, tile=tile, blocks=[0], backend="torch")
    with plans(monkeypatch) as made:
        run(model, inputs_of(model))
    ((x, plan),) = made
    grid = (3, 4, 6)
    r_tiles = tile_rs("atc", math.prod(grid) // 2, grid, tile)
    for i in range(2):
        seen: set[int] = set()
        for tokens, r_t in zip(tiles_of(grid, tile), r_tiles):
            got = plan.labels[i, tokens]
            assert not seen & set(got.tolist())  # no cluster spans two tiles
            seen |= set(got.tolist())
            if len(tokens) > 1:
                ref = scipy_cuts(x[i, tokens].double(), "average", [len(tokens) - r_t])[:, 0]
                assert same_partition(got, ref), (tile, i)


@pytest.mark.parametrize("kind", VIDEO)
def test_the_grid_is_frames_by_height_by_width(kind, monkeypatch):
    """ATC in tiles of one frame, one row (of every frame) or one column: every cluster lies
    in one frame, row or column of the 3 x 4 x 6 grid (4 x 6: not square, so a transposed
    frame would show); without tiles some cluster spans frames. (tome_sd's windows are
    checked against their definition above.)"""
    model = model_of(kind)
    inputs = inputs_of(model)
    hw = 4 * 6

    def clusters(**opts) -> list[set[tuple[int, int, int]]]:
        atc_patch.apply_patch(model, "atc", ratio=0.5, blocks=[0], **opts)
        with plans(monkeypatch) as made:
            run(model, inputs)
        monkeypatch.undo()
        out: dict[int, set] = {}
        for k, c in enumerate(made[0][1].labels[0].tolist()):
            out.setdefault(c, set()).add((k // hw, k % hw // 6, k % 6))
        return list(out.values())

    for tile, axis in (((1, 4, 6), 0), ((3, 1, 6), 1), ((3, 4, 1), 2)):
        assert all(len({t[axis] for t in c}) == 1 for c in clusters(tile=tile)), tile
    assert any(len({f for f, _, _ in c}) > 1 for c in clusters())


# ---------------------------------------------------------------------------------------------
# which rows reach the sublayers: the text whole, the image merged by the block's plan
# ---------------------------------------------------------------------------------------------
# (sublayer option, block index, a linear layer seeing the sublayer's sequence, text rows in
# front of the image's); text after the image's passes as well (HunyuanVideo's [image, text])
LAYOUTS = {
    "tiny-wan": [
        ("merge_attn", 0, "attn1.to_q", 0),
        ("merge_crossattn", 0, "attn2.to_q", 0),
        ("merge_mlp", 0, "ffn.net.0.proj", 0),
    ],
    "tiny-cogvideox": [("merge_attn", 0, "attn1.to_q", 6), ("merge_mlp", 0, "ff.net.0.proj", 6)],
    "tiny-ltx": [
        ("merge_attn", 0, "attn1.to_q", 0),
        ("merge_crossattn", 0, "attn2.to_q", 0),
        ("merge_mlp", 0, "ff.net.0.proj", 0),
    ],
    "tiny-hunyuanvideo": [
        ("merge_attn", 0, "attn.to_q", 0),  # double: image stream only
        ("merge_mlp", 0, "ff.net.0.proj", 0),
        ("merge_attn", 1, "attn.to_q", 0),  # single: [image, text]
    ],
}


@pytest.mark.parametrize("kind", VIDEO)
def test_only_the_image_rows_merge(kind):
    """One sublayer at a time: the rows reaching it are the unpatched rows with the image's
    ``N`` rows replaced by the plan (made from the block's input tokens) merging them; the text
    rows (CogVideoX's joint attention and its ``ff`` on ``[text, image]``, HunyuanVideo's
    single-stream ``[image, text]``) are bit-identical."""
    model = model_of(kind)
    inputs = inputs_of(model)
    n = 3 * 4 * 6
    flags = ("merge_attn", "merge_crossattn", "merge_mlp")
    for option, index, path, t in LAYOUTS[kind]:
        block = transformer_blocks(model)[index]
        layer = block.get_submodule(path)
        with recording(layer, []) as plain:
            x = _block_input(model, block, inputs)
        plan = cluster_tokens(x, n // 2, "atc")
        opts = {f: f == option for f in flags}
        atc_patch.apply_patch(model, "atc", ratio=0.5, blocks=[index], **opts)
        with recording(layer, []) as merged:
            run(model, inputs)
        atc_patch.remove_patch(model)
        ref = plain[0]
        want = torch.cat([ref[:, :t], plan.merge(ref[:, t : t + n]), ref[:, t + n :]], dim=1)
        assert torch.equal(torch.cat(merged), want), (kind, index, path)


# ---------------------------------------------------------------------------------------------
# rotary tables follow the plan
# ---------------------------------------------------------------------------------------------
def _paired_latents(model, inputs) -> dict:
    """Latents ``(..., H, W)`` (or packed ``(B, N, C)`` tokens, raster order) whose tokens
    come in identical horizontal pairs."""
    x = inputs["hidden_states"].clone()
    if x.dim() == 3:
        x[:, 1::2] = x[:, 0::2]
        return dict(inputs, hidden_states=x)
    size = model.config.patch_size
    p = size[-1] if isinstance(size, tuple) else size
    x.unflatten(-1, (-1, 2, p))[..., 1, :] = x.unflatten(-1, (-1, 2, p))[..., 0, :]
    return dict(inputs, hidden_states=x)


TEXT_IN_ATTENTION = {
    "tiny-wan": 0,
    "tiny-cogvideox": 6,
    "tiny-ltx": 0,
    "tiny-hunyuanvideo": 0,
}  # text rows in front of the image's


@pytest.mark.parametrize("kind", VIDEO)
def test_rotary_tables_follow_the_plan(kind):
    """Tokens in identical pairs merge pair by pair; each merged query and key of the
    self-attention is then rotated by its pair's mean ``(cos, sin)`` rows, i.e. equals the
    mean of the pair's rotated queries and keys in the unpatched attention; text rows (the
    joint attention of CogVideoX) are the unpatched ones."""
    model = model_of(kind)
    inputs = _paired_latents(model, inputs_of(model))
    block = transformer_blocks(model)[0]
    attn = getattr(block, "attn1", None) or block.attn
    with sdpa_calls(attn, []) as plain:
        run(model, inputs)
    atc_patch.apply_patch(model, "atc", ratio=0.5, blocks=[0])
    with sdpa_calls(attn, []) as merged:
        run(model, inputs)
    n, o = 3 * 4 * 6, TEXT_IN_ATTENTION[kind]
    for j in (0, 1):  # query, key
        ref = plain[0][j]
        got = torch.cat([call[j] for call in merged])  # per-sample calls: one per sample
        assert got.shape[2] == ref.shape[2] - n // 2
        pairs = ref[:, :, o : o + n].unflatten(2, (n // 2, 2)).mean(3)
        torch.testing.assert_close(got[:, :, o : o + n // 2], pairs)
        torch.testing.assert_close(got[:, :, :o], ref[:, :, :o])
        torch.testing.assert_close(got[:, :, o + n // 2 :], ref[:, :, o + n :])  # text after
        assert not torch.allclose(pairs, ref[:, :, o : o + n : 2])  # the positions differ


class _SDPAKeys(TorchFunctionMode):
    """Records the ``key`` of every ``F.scaled_dot_product_attention`` call it sees (as the
    outer mode: after ``merge="kv"``'s own mode has merged them)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.keys.append(args[1] if len(args) > 1 else kwargs["key"])
        return func(*args, **kwargs)


@contextlib.contextmanager
def sdpa_keys(module: torch.nn.Module):
    """The keys of the SDPA calls made while ``module`` runs."""
    mode = _SDPAKeys()

    def enter(*args) -> None:
        mode.__enter__()

    def leave(*args) -> None:
        mode.__exit__(None, None, None)

    hooks = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield mode.keys
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("kind", VIDEO)
def test_kv_merges_the_image_keys_only(kind):
    """``merge="kv"``: the self- or joint attention keeps every query; its image keys become
    ``N / 2`` cluster means and its text keys (CogVideoX's in front, HunyuanVideo's after the
    image's) are the unpatched ones; ``merge_crossattn`` (Wan, LTX-Video) keeps merging the
    cross-attention's queries."""
    model = model_of(kind)
    inputs = inputs_of(model)
    block = transformer_blocks(model)[0]
    attn = getattr(block, "attn1", None) or block.attn
    with sdpa_keys(attn) as plain:
        run(model, inputs)
    cross = {"merge_crossattn": True} if kind in ("tiny-wan", "tiny-ltx") else {}
    atc_patch.apply_patch(model, "atc", ratio=0.5, blocks=[0], merge="kv", **cross)
    with sdpa_keys(attn) as merged:
        run(model, inputs)
    n, o = 3 * 4 * 6, TEXT_IN_ATTENTION[kind]
    k, mk = plain[0], merged[0]
    if k.shape[1] != mk.shape[1]:  # (B, S, H, D) from diffusers' dispatch: to (B, H, S, D)
        k, mk = k.transpose(1, 2), mk.transpose(1, 2)
    assert mk.shape[2] == k.shape[2] - n // 2, (k.shape, mk.shape)
    torch.testing.assert_close(mk[:, :, :o], k[:, :, :o])
    torch.testing.assert_close(mk[:, :, o + n // 2 :], k[:, :, o + n :])


# ---------------------------------------------------------------------------------------------
# conditioning frames never merge
# ---------------------------------------------------------------------------------------------
I2V = [
    ("tiny-wan", "attn1.to_q"),  # Wan 2.2 TI2V: per-token timestep
    ("tiny-ltx", "attn1.to_q"),  # LTX-Video image-to-video: per-token timestep
    ("tiny-hunyuanvideo-i2v", "attn.to_q"),  # HunyuanVideo-I2V: token_replace
]
PER_TOKEN_TIMESTEP = ("tiny-wan", "tiny-ltx")


@pytest.mark.parametrize("kind,path", I2V)
@pytest.mark.parametrize(
    "opts",
    [
        {"method": "atc"},
        {"method": "atc", "tile": (1, 2, 2)},
        {"method": "tome_sd", "st": 2},
        {"method": "tome"},
    ],
    ids=str,
)
def test_the_conditioning_frame_never_merges(kind, path, opts):
    """Image-to-video (a per-token timestep, 0 on the first latent frame): the first frame's
    rows reach the self-attention bit-identical to the unpatched ones; the later frames' rows
    are merged by the plan of their own tokens (as many as ``ratio`` of them removed), on
    their own ``(t - 1, h, w)`` grid."""
    model = model_of(kind)
    inputs = inputs_of(model, i2v=True)
    layer = transformer_blocks(model)[0].get_submodule(path)
    x = _first_block_input(model, inputs)
    with recording(layer, []) as plain:
        run(model, inputs)
    atc_patch.apply_patch(model, ratio=0.5, blocks=[0], **opts)
    with recording(layer, []) as merged:
        run(model, inputs)
    hw, n = 4 * 6, 2 * 4 * 6
    got, ref = torch.cat(merged), plain[0]
    assert torch.equal(got[:, :hw], ref[:, :hw])
    if opts["method"] == "atc":
        tiles = {"grid": (2, 4, 6), "tile": opts["tile"]} if "tile" in opts else {}
        plan = cluster_tokens(x[:, hw:], n // 2, "atc", **tiles)
        assert torch.equal(got[:, hw:], plan.merge(ref[:, hw:]))
    else:
        assert got.shape[1] == hw + n - n // 2


@pytest.mark.parametrize("kind", PER_TOKEN_TIMESTEP)
def test_conditioning_outside_the_first_frame_is_refused(kind):
    """A per-token timestep that differs after the first frame (conditioning frames elsewhere)
    cannot be protected: the call raises instead of merging them."""
    model = model_of(kind)
    inputs = inputs_of(model, i2v=True)
    inputs["timestep"] = inputs["timestep"].clone()
    inputs["timestep"][:, -3:] = 0
    atc_patch.apply_patch(model, "atc", ratio=0.5)
    with pytest.raises(RuntimeError, match="tokens after the first frame have different"):
        run(model, inputs)


def test_hunyuanvideo_mask_follows_the_merge():
    """The model builds a ``(B, 1, 1, N + T)`` bool mask (image columns and the valid prompt
    tokens True): double and single blocks' attention get it with the ``N'`` merged image
    columns True and the text columns as they were (the last sample's padding False)."""
    model = model_of("tiny-hunyuanvideo")
    inputs = inputs_of(model)
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge_mlp=True)
    text = inputs["encoder_attention_mask"].bool()
    want = torch.cat([torch.ones(2, 36, dtype=torch.bool), text], dim=1)[:, None, None]
    for block in transformer_blocks(model):
        with sdpa_calls(block.attn, []) as calls:
            run(model, inputs)
        got = torch.cat([mask for _, _, mask in calls])
        assert torch.equal(got, want)
        assert not got[-1, ..., -2:].any()


def test_ltx_video_coords_are_refused():
    """``LTXConditionPipeline`` passes ``video_coords``: its conditioning tokens may be anywhere
    and appended after the video's, so the patched call raises instead of merging them."""
    model = model_of("tiny-ltx")
    inputs = inputs_of(model)
    n = inputs["hidden_states"].shape[1]
    inputs["video_coords"] = torch.zeros(2, 3, n)
    atc_patch.apply_patch(model, "atc", ratio=0.5)
    with pytest.raises(ValueError, match="video_coords"):
        run(model, inputs)


# ---------------------------------------------------------------------------------------------
# the 3-D options where they cannot apply
# ---------------------------------------------------------------------------------------------
def test_3d_options_are_checked_against_the_grid():
    wan = model_of("tiny-wan")
    flux = build_transformer("tiny-flux")
    with pytest.raises(ValueError, match=r"tile=\(4, 4\) does not fit .*\(tt, th, tw\)"):
        atc_patch.apply_patch(wan, "atc", tile=(4, 4))
    with pytest.raises(ValueError, match=r"st=2 sets how many frames .* image's \(h, w\)"):
        atc_patch.apply_patch(flux, "tome_sd", st=2)
    with pytest.raises(ValueError, match=r"tile=\(1, 4, 4\) does not fit .*give \(th, tw\)"):
        atc_patch.apply_patch(flux, "atc", tile=(1, 4, 4))
    with pytest.raises(ValueError, match="st"):
        atc_patch.apply_patch(wan, "atc", st=2)  # a tome_sd option
    with pytest.raises(ValueError, match="st must be"):
        atc_patch.apply_patch(wan, "tome_sd", st=0)
    with pytest.raises(ValueError, match=r"tile must be \(th, tw\) .* \(tt, th, tw\)"):
        atc_patch.apply_patch(wan, "atc", tile=(1, 2, 2, 2))
    for model in (wan, flux):
        assert atc_patch.patch_settings(model) is None
    atc_patch.apply_patch(wan, "tome_sd", st=3, sx=1, sy=1)  # 3 x 1 x 1 windows: valid
    assert atc_patch.patch_settings(wan)["st"] == 3


def test_st_is_refused_on_a_unet():
    from atc_patch.testing import build_unet

    unet = build_unet()
    with pytest.raises(ValueError, match=r"st=2 sets how many frames .* a UNet"):
        atc_patch.apply_patch(unet, "tome_sd", st=2)
    assert atc_patch.patch_settings(unet) is None


# ---------------------------------------------------------------------------------------------
# a pipeline with two transformers (Wan 2.2 A14B: high-noise, then low-noise steps)
# ---------------------------------------------------------------------------------------------
def _wan22_pipeline(layers_2: int = 2):
    import diffusers

    from atc_patch.testing.dit import transformer_config

    _, kwargs = transformer_config("tiny-wan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        second = diffusers.WanTransformer3DModel(**dict(kwargs, num_layers=layers_2)).eval()
    return diffusers.WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None,
        transformer=model_of("tiny-wan"), transformer_2=second, boundary_ratio=0.875,
    )  # fmt: skip


def test_a_pipeline_patches_both_transformers():
    pipe = _wan22_pipeline()
    inputs = inputs_of(pipe.transformer)
    plain = [run(t, inputs) for t in (pipe.transformer, pipe.transformer_2)]
    atc_patch.apply_patch(pipe, "atc", ratio=0.5)
    for t, ref in zip((pipe.transformer, pipe.transformer_2), plain):
        assert atc_patch.patch_settings(t)["ratio"] == 0.5
        assert not torch.equal(run(t, inputs), ref)
    atc_patch.remove_patch(pipe)
    for t, ref in zip((pipe.transformer, pipe.transformer_2), plain):
        assert atc_patch.patch_settings(t) is None
        assert torch.equal(run(t, inputs), ref)


def test_a_failed_pipeline_apply_leaves_both_as_they_were():
    """``blocks=[1]`` fits the first transformer (2 blocks) but not the second (1 block): the
    first is put back to its previous settings, the second stays unpatched."""
    pipe = _wan22_pipeline(layers_2=1)
    inputs = inputs_of(pipe.transformer)
    atc_patch.apply_patch(pipe.transformer, "atc", ratio=0.25)
    before = [run(t, inputs) for t in (pipe.transformer, pipe.transformer_2)]
    with pytest.raises(ValueError, match="out of range"):
        atc_patch.apply_patch(pipe, "atc", ratio=0.5, blocks=[1])
    assert atc_patch.patch_settings(pipe.transformer)["ratio"] == 0.25
    assert atc_patch.patch_settings(pipe.transformer_2) is None
    for t, ref in zip((pipe.transformer, pipe.transformer_2), before):
        assert torch.equal(run(t, inputs), ref)


@pytest.mark.parametrize("kind", ["tiny-pixart", "tiny-unet"])
def test_kv_keeps_merging_cross_attention_queries(kind):
    """``merge="kv"`` with ``merge_crossattn`` on the image models with cross-attention: the
    cross-attention (keys: the text) keeps merging its queries instead of raising that its
    attention was not over its own tokens; it changes the output beyond kv alone."""
    from atc_patch.testing import build_unet, unet_inputs

    if kind == "tiny-unet":
        model, inputs = build_unet(), None
        inputs = unet_inputs(model, batch=2, height=8, width=8)
    else:
        model = build_transformer(kind)
        inputs = transformer_inputs(model, batch=2, height=8, width=8)
    outs = []
    for cross in (False, True):
        atc_patch.apply_patch(model, "atc", ratio=0.5, merge="kv", merge_crossattn=cross)
        outs.append(run(model, inputs))
    assert not torch.equal(*outs)


@pytest.mark.parametrize("kind", [*VIDEO, "tiny-hunyuanvideo-i2v"])
@pytest.mark.parametrize("method", ["atc", "tome_sd"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, method):
    """diffusers' checkpointed blocks recompute within the call they belong to (same grid,
    same conditioning frame, same tome_sd draws): gradients bit-identical to without."""
    grads = []
    for checkpointing in (False, True):
        model = model_of(kind).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        atc_patch.apply_patch(model, method, ratio=0.5, merge_mlp=True)
        inputs = inputs_of(model, i2v=kind in PER_TOKEN_TIMESTEP)
        model(**inputs).sample.square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))
