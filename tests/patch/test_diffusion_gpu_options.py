"""The diffusion core's GPU options (issue 21): ``tile`` (exact ATC per tile against scipy, at
the patch level), ``plan_scope="resolution"`` and ``reuse_steps`` (clustering calls per model
call, invalidation, threads, copies, gradient checkpointing, ``torch.compile``), ``merge="kv"``
(identical tokens give exactly the unmerged attention; queries keep every token) and no host
synchronisation in a patched step with any of them."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import same_partition
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

import atc_patch
from atc_patch.kernel import max_reduction
from atc_patch.kernel.plan import MergePlan
from atc_patch.patch.diffusion import core, kv
from atc_patch.testing import transformer_inputs, unet_inputs

from ._models import model_of
from .test_diffusion_call_state import CountSyncs

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")
ALL_ON = {"plan_scope": "resolution", "reuse_steps": 2, "merge": "kv", "merge_mlp": True}


def inputs_of(model, kind: str, batch: int = 2, h: int = 16, w: int = 16, **kw) -> dict:
    """UNets: ``h x w`` latents; transformers: an ``h/2 x w/2`` grid of image tokens."""
    if kind in ("tiny-sd", "tiny-sdxl"):
        return unet_inputs(model, batch=batch, height=h, width=w, **kw)
    return transformer_inputs(model, batch=batch, height=h // 2, width=w // 2, **kw)


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def at(inputs: dict, t: float) -> dict:
    """The inputs of a later denoising step: timestep ``t``, the latents moved by ``t``."""
    name = "sample" if "sample" in inputs else "hidden_states"
    x = inputs[name]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    scale = t / 1000 if t > 1 else t
    return dict(
        inputs, **{name: x + scale * noise}, timestep=torch.full_like(inputs["timestep"], t)
    )


class Recorded:
    """``core.cluster_tokens`` calls: ``(metric, r, method, kwargs, plan)`` each."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple] = []
        kernel = core.cluster_tokens

        def record(metric, r, method="atc", **kw):
            plan = kernel(metric, r, method, **kw)
            self.calls.append((metric, r, method, kw, plan))
            return plan

        monkeypatch.setattr(core, "cluster_tokens", record)

    def take(self) -> list[tuple]:
        out, self.calls = self.calls, []
        return out


# ---------------------------------------------------------------------------------------------
# tile: exact ATC per tile, at the patch level
# ---------------------------------------------------------------------------------------------
def tiles_of(grid: tuple[int, int], tile: tuple[int, int]) -> list[list[int]]:
    """Grid indices of each tile, tiles in raster order, raster order inside (ragged edges)."""
    (h, w), (th, tw) = grid, tile
    return [
        [y * w + x for y in range(y0, min(y0 + th, h)) for x in range(x0, min(x0 + tw, w))]
        for y0 in range(0, h, th)
        for x0 in range(0, w, tw)
    ]


def scipy_partition(x: torch.Tensor, link: str, k: int) -> np.ndarray:
    u = x.double().numpy()
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    d = np.clip(1.0 - u @ u.T, 0.0, 2.0)
    np.fill_diagonal(d, 0.0)
    return cut_tree(linkage(squareform(d, checks=False), method=link), n_clusters=k)[:, 0]


@pytest.mark.parametrize(
    ("kind", "hw", "tile", "link"),
    [
        ("tiny-sd", (16, 24), (5, 7), "average"),  # ragged tiles both ways
        ("tiny-sd", (16, 16), (4, 8), "complete"),
        ("tiny-flux", (12, 20), (3, 4), "single"),  # the grid from img_ids (6 x 10)
    ],
)
def test_tiled_atc_is_scipy_per_tile_in_a_patched_block(kind, hw, tile, link, monkeypatch):
    model = model_of(kind)
    inputs = inputs_of(model, kind, h=hw[0], w=hw[1])
    atc_patch.apply_patch(model, "atc", ratio=0.5, linkage=link, tile=tile)
    rec = Recorded(monkeypatch)
    run(model, inputs)
    calls = rec.take()
    assert calls
    grid = (hw[0], hw[1]) if kind == "tiny-sd" else (hw[0] // 2, hw[1] // 2)
    for metric, r, _, kw, plan in calls[:2]:
        n = metric.shape[1]
        assert kw["grid"] == grid and kw["tile"] == tile and n == grid[0] * grid[1]
        assert r == int(n * 0.5) and plan.num_out == n - r
        tiles = tiles_of(grid, tile)
        caps = [len(t) - 1 for t in tiles]
        r_tiles = [int(v) for v in np.asarray(_reference_split(r, caps))]
        for i in range(metric.shape[0]):
            labels = plan.labels[i]
            seen = set()
            for tokens, r_t in zip(tiles, r_tiles, strict=True):
                got = labels[tokens].numpy()
                assert not seen & set(got.tolist())  # a cluster never spans two tiles
                seen |= set(got.tolist())
                want = scipy_partition(metric[i, tokens], link, len(tokens) - r_t)
                assert same_partition(got, want)


def _reference_split(r: int, caps: list[int]) -> list[int]:
    """Floors of ``r * cap / sum(caps)``, the rest to the largest remainders (earlier first)."""
    total = sum(caps)
    out = [r * c // total for c in caps]
    order = sorted(range(len(caps)), key=lambda t: (-(r * caps[t] % total), t))
    for t in order[: r - sum(out)]:
        out[t] += 1
    return out


def test_auto_backend_sees_rows_of_one_tile(monkeypatch):
    """``backend="auto"`` picks the fused path on CUDA for rows of at most 1024 tokens: with
    tiles, a row is one tile at any resolution."""
    import atc_patch.kernel as kernel

    rows = []
    resolve = kernel.resolve_backend
    monkeypatch.setattr(
        kernel, "resolve_backend", lambda b, d, n: rows.append(n) or resolve(b, d, n)
    )
    model = model_of("tiny-sd")
    atc_patch.apply_patch(model, "atc", ratio=0.5, tile=(4, 8))
    run(model, inputs_of(model, "tiny-sd", h=32, w=32))  # 1024 tokens at stride 1
    assert rows and set(rows) == {32}


def test_tile_needs_no_tome_sd_and_warns_when_capped():
    with pytest.raises(ValueError, match="local already"):
        atc_patch.apply_patch(model_of("tiny-sd"), "tome_sd", ratio=0.5, tile=(4, 4))
    model = model_of("tiny-sd")
    atc_patch.apply_patch(model, "tome", ratio=0.9, tile=(2, 2))  # ToMe: 2 of 4 per tile
    with pytest.warns(UserWarning, match="each 2x2 tile keeps"):
        run(model, inputs_of(model, "tiny-sd"))
    assert max_reduction("tome", 256, grid=(16, 16), tile=(2, 2)) == 128


# ---------------------------------------------------------------------------------------------
# plan_scope="resolution", reuse_steps
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
@pytest.mark.parametrize("method", METHODS)
def test_one_clustering_call_per_resolution(kind, method, monkeypatch):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    opts = {"max_downsample": 2} if kind == "tiny-sd" else {}  # two resolutions
    atc_patch.apply_patch(model, method, ratio=0.5, merge_mlp=True, **opts)
    rec = Recorded(monkeypatch)
    per_block = run(model, inputs)
    blocks = len(rec.take())
    atc_patch.apply_patch(model, method, ratio=0.5, merge_mlp=True, plan_scope="resolution", **opts)
    out = run(model, inputs)
    calls = rec.take()
    sizes = [m.shape[1] for m, *_ in calls]
    assert sorted(sizes) == sorted(set(sizes)) == ([64, 256] if kind == "tiny-sd" else [64])
    assert blocks > len(calls)
    assert not torch.equal(out, per_block)  # later blocks apply the first block's plan


def test_later_blocks_apply_the_first_blocks_plan(monkeypatch):
    model = model_of("tiny-flux")
    atc_patch.apply_patch(model, "atc", ratio=0.5, plan_scope="resolution")
    plans = []
    real = core.block_plan

    def spy(active):
        plan = real(active)
        plans.append(plan)
        return plan

    monkeypatch.setattr(core, "block_plan", spy)
    run(model, inputs_of(model, "tiny-flux"))
    assert len(plans) == 4 and all(p is plans[0] for p in plans)


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_reuse_steps_clusters_on_every_kth_call(kind, monkeypatch):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    atc_patch.apply_patch(model, "atc", ratio=0.5, plan_scope="resolution", reuse_steps=3)
    rec = Recorded(monkeypatch)
    outs, counts = [], []
    ts = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3) if kind == "tiny-flux" else (900, 800, 700, 600)
    for t in ts:
        outs.append(run(model, at(inputs, t)))
        counts.append(len(rec.take()))
    assert counts[:4] == [1, 0, 0, 1] and counts[4:] in ([0, 0, 1], [])
    # A kept plan is the one made from the first call's tokens: the same as recomputing it
    # there, not as recomputing it on the later call's tokens.
    atc_patch.apply_patch(model, "atc", ratio=0.5, plan_scope="resolution")
    assert not torch.equal(run(model, at(inputs, ts[1])), outs[1])
    # Another batch size or resolution: the plans are made again, and the count restarts.
    atc_patch.apply_patch(model, "atc", ratio=0.5, plan_scope="resolution", reuse_steps=3)
    run(model, inputs)
    run(model, inputs)
    rec.take()
    one = {k: v[:1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v for k, v in inputs.items()}
    run(model, one)
    run(model, inputs_of(model, kind, h=24, w=16))
    run(model, inputs_of(model, kind, h=24, w=16))
    assert len(rec.take()) == 2


def test_reused_plans_equal_plans_made_once(monkeypatch):
    """reuse_steps=k: calls 1..k-1 apply call 0's plans exactly (the same outputs as a patch
    that is handed call 0's plans)."""
    model = model_of("tiny-sd")
    inputs = inputs_of(model, "tiny-sd")
    atc_patch.apply_patch(model, "atc", ratio=0.5, reuse_steps=2)
    rec = Recorded(monkeypatch)
    run(model, at(inputs, 900))
    first = [c[4] for c in rec.take()]
    reused = run(model, at(inputs, 800))
    assert rec.take() == []
    plans = iter(first)
    monkeypatch.setattr(core, "cluster_tokens", lambda *a, **k: next(plans))
    atc_patch.apply_patch(model, "atc", ratio=0.5)
    assert torch.equal(run(model, at(inputs, 800)), reused)


def test_plan_stores_are_per_thread_and_copies_start_empty(monkeypatch):
    model = model_of("tiny-sd")
    atc_patch.apply_patch(model, "atc", ratio=0.5, reuse_steps=4)
    jobs = [inputs_of(model, "tiny-sd", seed=i) for i in range(3)]
    # Each thread's first call makes its own plans from its own tokens.
    fresh = []
    for job in jobs:
        twin = copy.deepcopy(model)
        fresh.append([run(twin, job), run(twin, at(job, 500))])
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            assert torch.equal(run(model, jobs[i]), fresh[i][0])
            assert torch.equal(run(model, at(jobs[i], 500)), fresh[i][1])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    run(model, jobs[0])  # this thread's store now holds job 0's plans
    for dup in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(run(dup, jobs[1]), fresh[1][0])  # its own, not job 0's


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_gradient_checkpointing_with_shared_and_kept_plans(kind):
    model = model_of(kind).train()
    inputs = inputs_of(model, kind, h=16, w=24)
    opts = {"max_downsample": 2} if kind == "tiny-sd" else {}
    atc_patch.apply_patch(model, "atc", ratio=0.5, tile=(4, 4), **ALL_ON, **opts)

    def grads() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            model(**inputs).sample.square().mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = [grads(), grads()]  # a call that makes the plans, one that keeps them
    model.enable_gradient_checkpointing()
    assert all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(plain, [grads(), grads()])
    )


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_fullgraph_compile_follows_the_reuse_count(kind):
    torch._dynamo.reset()
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    atc_patch.apply_patch(model, "atc", ratio=0.5, tile=(4, 4), **ALL_ON)
    ts = (0.9, 0.7, 0.5) if kind == "tiny-flux" else (900, 700, 500)
    eager = [run(model, at(inputs, t)) for t in ts]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for t, want in zip(ts, eager, strict=True):
        torch.testing.assert_close(run(compiled, at(inputs, t)), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# merge="kv"
# ---------------------------------------------------------------------------------------------
def _pairs_plan(b: int, n: int) -> MergePlan:
    """Tokens ``2i`` and ``2i + 1`` merge (every sample)."""
    return MergePlan(torch.arange(n).div(2, rounding_mode="floor").expand(b, n), n // 2)


@pytest.mark.parametrize("image_first", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_kv_of_identical_tokens_is_exactly_the_unmerged_attention(image_first, with_mask):
    g = torch.Generator().manual_seed(0)
    b, h, n, t, d = 2, 3, 8, 5, 4
    q = torch.randn(b, h, n + t, d, generator=g, dtype=torch.float64)
    img = torch.randn(b, h, n // 2, 2 * d, generator=g, dtype=torch.float64)
    img = img.repeat_interleave(2, dim=2)  # pairs of identical keys and values
    text = torch.randn(b, h, t, 2 * d, generator=g, dtype=torch.float64)
    kvs = torch.cat([img, text] if image_first else [text, img], dim=2)
    k, v = kvs[..., :d], kvs[..., d:]
    mask = None
    if with_mask:  # a key mask: the last text key hidden, every image pair alike
        keep = torch.ones(b, 1, 1, n + t, dtype=torch.bool)
        keep[..., n + t - 1 if image_first else t - 1] = False
        mask = keep
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    mode = kv.KVAttention(_pairs_plan(b, n), n + t, 0 if image_first else t)
    with mode:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        other = F.scaled_dot_product_attention(q[..., :3, :], k[..., :3, :], v[..., :3, :])
    assert mode.hits == 1 and other.shape == (b, h, 3, d)  # other lengths pass through
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    no_bias = F.scaled_dot_product_attention(q, *_halved(k, v, image_first, n))
    assert not torch.allclose(no_bias, want)  # without log(size) the pairs weigh as one


def _halved(k, v, image_first, n):
    keep = torch.ones(k.shape[2], dtype=torch.bool)
    image = torch.arange(k.shape[2])
    image = image[:n] if image_first else image[-n:]
    keep[image[1::2]] = False
    return k[:, :, keep], v[:, :, keep]


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux", "tiny-sd3", "tiny-pixart"])
def test_kv_keeps_every_query_and_merges_keys(kind):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge="kv")
    if kind == "tiny-sd":
        attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    else:
        attn = model.transformer_blocks[0]
        attn = attn.attn1 if kind == "tiny-pixart" else attn.attn
    seen = {}
    for name in ("to_q", "to_k", "to_out"):
        layer = getattr(attn, name)
        layer = layer[0] if isinstance(layer, torch.nn.ModuleList) else layer
        layer.register_forward_pre_hook(
            lambda m, a, name=name: seen.setdefault(name, a[0].shape) and None
        )
    lengths = []
    real = F.scaled_dot_product_attention

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is real:
                key = kwargs.get("key", args[1] if len(args) > 1 else None)
                lengths.append((args[0] if args else kwargs["query"]).shape[-2] - key.shape[-2])
            return func(*args, **kwargs)

    with Spy():
        run(model, inputs)
    n = 256 if kind == "tiny-sd" else 64
    assert seen["to_q"][1] == seen["to_k"][1] == seen["to_out"][1] == n  # no merge, no unmerge
    assert n // 2 in lengths  # the attention itself saw half the image keys


def test_kv_outside_sdpa_is_an_error_not_a_silent_no_op():
    from diffusers.models.attention_processor import AttnProcessor

    model = model_of("tiny-sd")
    model.set_attn_processor(AttnProcessor())  # the math path: baddbmm + softmax
    atc_patch.apply_patch(model, "atc", ratio=0.5, merge="kv")
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        run(model, inputs_of(model, "tiny-sd"))


def test_kv_with_zero_ratio_and_remove_are_bit_identical():
    model = model_of("tiny-flux")
    inputs = inputs_of(model, "tiny-flux")
    ref = run(model, inputs)
    atc_patch.apply_patch(model, "atc", ratio=0.0, tile=(2, 2), **ALL_ON)
    assert torch.equal(run(model, inputs), ref)
    atc_patch.apply_patch(model, "atc", ratio=0.5, tile=(2, 2), **ALL_ON)
    assert not torch.equal(run(model, inputs), ref)
    atc_patch.remove_patch(model)
    assert torch.equal(run(model, inputs), ref)


# ---------------------------------------------------------------------------------------------
# no host synchronisation in a patched step, with every option
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux", "tiny-sd3"])
@pytest.mark.parametrize("method", METHODS)
def test_a_step_with_the_gpu_options_reads_no_tensor_value_on_the_host(kind, method, monkeypatch):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    mode = CountSyncs.outside_the_kernel(monkeypatch)
    tile = {} if method == "tome_sd" else {"tile": (4, 4)}
    atc_patch.apply_patch(model, method, ratio=0.5, **tile, **ALL_ON)
    run(model, inputs)  # Flux: img_ids' grid is read here, once per img_ids tensor
    with mode:
        for t in (0.3, 0.2, 0.1):  # made, kept, made again
            run(model, at(inputs, t if kind != "tiny-sd" else 1000 * t))
    assert mode.ops == []


@pytest.mark.slow
def test_inductor_compiled_unet_with_the_gpu_options_matches_eager():
    torch._dynamo.reset()
    model = model_of("tiny-sd")
    inputs = inputs_of(model, "tiny-sd")
    atc_patch.apply_patch(model, "atc", ratio=0.5, tile=(8, 8), **ALL_ON)
    eager = [run(model, at(inputs, t)) for t in (900.0, 800.0)]
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    for t, want in zip((900.0, 800.0), eager, strict=True):
        torch.testing.assert_close(run(compiled, at(inputs, t)), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_the_generation_script_takes_the_gpu_options(tmp_path, capsys, kind):
    """The FID workflow's generator (``benchmarks/fid.py`` step 2) with the new options."""
    from .test_diffusion_unet import _load_script

    example = _load_script("examples/sd_generate.py")
    example.main(["--model_id", kind, "--merge_fn_str", "atc", "--steps", "2", "--height", "64",
                  "--width", "64", "--prompt", "a cat", "--tile", "4", "4", "--plan_scope",
                  "resolution", "--reuse_steps", "2", "--merge", "kv", "--output_dir",
                  str(tmp_path)])  # fmt: skip
    assert [p.name for p in tmp_path.glob("*.png")] == ["00000.png"]
    out = capsys.readouterr().out
    assert "'tile': (4, 4)" in out and "'merge': 'kv'" in out and "'reuse_steps': 2" in out
