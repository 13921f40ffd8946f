"""The diffusion core's per-call state, in both families: ``tome_sd``'s seeding (on the device,
no host read), gradient-checkpoint replay, concurrent calls, ``torch.compile`` and ``meta``."""

from __future__ import annotations

import copy
import functools
import math
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import atc_patch
from atc_patch.kernel import max_reduction
from atc_patch.kernel.plan import MergePlan
from atc_patch.patch.diffusion import core, draws
from atc_patch.patch.diffusion.unet import transformer_blocks
from atc_patch.testing import transformer_inputs, unet_inputs

from ._models import model_of

METHODS = ("atc", "tome_sd", "tome", "kmedoids", "dpcknn")
DITS = ("tiny-flux", "tiny-sd3", "tiny-pixart", "tiny-dit")

pytestmark = pytest.mark.usefixtures("one_thread")


def inputs_of(model, kind: str, batch: int = 2, h: int = 16, w: int = 16, **kw) -> dict:
    if kind == "tiny-sd":
        return unet_inputs(model, batch=batch, height=h, width=w, **kw)
    if kind == "tiny-dit":
        w = h  # diffusers' DiT un-patchifies square grids only
    return transformer_inputs(model, batch=batch, height=h // 2, width=w // 2, **kw)


@torch.no_grad()
def run(model, inputs) -> torch.Tensor:
    return model(**inputs).sample


def with_timestep(inputs: dict, t: float) -> dict:
    return dict(inputs, timestep=torch.full_like(inputs["timestep"], t))


# ---------------------------------------------------------------------------------------------
# tome_sd's random destinations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_tome_sd_draws_follow_seed_timestep_and_generator(kind):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    t0, t1 = (500.0, 400.0) if kind == "tiny-sd" else (0.5, 0.4)

    def out(t=t0, **opts):
        atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, **opts)
        return run(model, with_timestep(inputs, t))

    a = out(seed=1)
    assert torch.equal(a, out(seed=1))
    assert not torch.equal(a, out(seed=2))
    assert not torch.equal(a, out(t1, seed=1))  # every denoising step draws anew
    assert not torch.equal(out(use_rand=False), a)
    g = torch.Generator().manual_seed(7)  # a user generator, advanced once per call
    e = out(generator=g)
    assert not torch.equal(e, run(model, with_timestep(inputs, t0)))
    g.manual_seed(7)
    assert torch.equal(e, run(model, with_timestep(inputs, t0)))
    torch.manual_seed(3)  # seed=None: drawn from the global RNG without advancing it
    f = out()
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(torch.rand(1), after)
    torch.manual_seed(3)
    assert torch.equal(f, out())


def test_picks_are_uniform_and_differ_per_block_and_call():
    cfg = atc_patch.DiffusionConfig(method="tome_sd", seed=5)
    call = core.Call(None, torch.tensor(500.0))
    a = draws.picks(call, cfg, 0, (64, 64), torch.device("cpu"))
    assert a.shape == (64, 64) and a.dtype == torch.long
    counts = torch.bincount(a.flatten(), minlength=4)
    assert ((counts - 1024).abs() < 4 * 32).all(), counts  # 4 sigma of a fair draw
    assert torch.equal(a, draws.picks(call, cfg, 0, (64, 64), torch.device("cpu")))
    assert (a != draws.picks(call, cfg, 1, (64, 64), torch.device("cpu"))).float().mean() > 0.6
    other = core.Call(None, torch.tensor(499.0))
    assert (a != draws.picks(other, cfg, 0, (64, 64), torch.device("cpu"))).float().mean() > 0.6


def test_deepcopy_does_not_share_the_user_generator():
    unet = model_of("tiny-sd")
    g = torch.Generator().manual_seed(4)
    atc_patch.apply_patch(unet, method="tome_sd", ratio=0.5, generator=g)
    twin = copy.deepcopy(unet)
    inputs = inputs_of(unet, "tiny-sd")
    state = g.get_state()
    a = run(twin, inputs)
    assert torch.equal(g.get_state(), state)  # the copy draws from its own generator
    assert torch.equal(run(unet, inputs), a)  # ... which started where g was


# ---------------------------------------------------------------------------------------------
# no host synchronisation in a patched step (the kernel's own calls aside)
# ---------------------------------------------------------------------------------------------
_SYNCS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "item"}


class CountSyncs(TorchDispatchMode):
    """Records the host-synchronising ops run while active (not while ``paused``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.paused = False

    @classmethod
    def outside_the_kernel(cls, monkeypatch) -> CountSyncs:
        """A counter paused inside the diffusion core's ``cluster_tokens`` calls (the kernel's
        own syncs are the kernel's business)."""
        mode, kernel = cls(), core.cluster_tokens

        def paused(*args, **kwargs):
            mode.paused = True
            try:
                return kernel(*args, **kwargs)
            finally:
                mode.paused = False

        monkeypatch.setattr(core, "cluster_tokens", paused)
        return mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.overloadpacket.__name__ in _SYNCS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux", "tiny-sd3"])
@pytest.mark.parametrize("method", METHODS)
def test_a_patched_step_reads_no_tensor_value_on_the_host(kind, method, monkeypatch):
    model = model_of(kind)
    inputs = inputs_of(model, kind)
    mode = CountSyncs.outside_the_kernel(monkeypatch)
    atc_patch.apply_patch(model, method, ratio=0.5, merge_mlp=True)
    ref = run(model, inputs)  # Flux: img_ids' grid is read here, once per img_ids tensor
    with mode:
        out = run(model, with_timestep(inputs, 0.25 if kind != "tiny-sd" else 250.0))
    assert mode.ops == []
    assert out.shape == ref.shape


# ---------------------------------------------------------------------------------------------
# gradient checkpointing: the recomputation runs within its call (grid and draws)
# ---------------------------------------------------------------------------------------------
def _grads(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # DiT drops class labels at random in training mode
    with torch.enable_grad():
        loss = model(**inputs).sample.square().mean()
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)], ids=["16x16", "16x24"])
@pytest.mark.parametrize("method", METHODS)
def test_unet_gradient_checkpointing_gives_the_same_gradients(method, hw):
    unet = model_of("tiny-sd").train()
    seed = {"seed": 5} if method == "tome_sd" else {}
    atc_patch.apply_patch(unet, method=method, ratio=0.5, max_downsample=2, **seed)
    inputs = inputs_of(unet, "tiny-sd", h=hw[0], w=hw[1])
    calls = []
    transformer_blocks(unet)[0][1].register_forward_pre_hook(lambda m, a: calls.append(1))
    loss, ref = _grads(unet, inputs)
    unet.enable_gradient_checkpointing()  # after patching, as a training script would
    loss_ckpt, got = _grads(unet, inputs)
    assert len(calls) == 3  # plain, then checkpointed: first pass + recomputation
    assert torch.equal(loss_ckpt, loss)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    atc_patch.remove_patch(unet)
    assert not any(isinstance(vars(m).get(core.CKPT_ATTR), core.CheckpointInCall)
                   for m in unet.modules())  # fmt: skip


@pytest.mark.parametrize("kind", DITS)
@pytest.mark.parametrize("method", METHODS)
def test_dit_gradient_checkpointing_gives_the_same_gradients(kind, method):
    model = model_of(kind).train()
    inputs = inputs_of(model, kind, h=12, w=8)
    atc_patch.apply_patch(model, method=method, ratio=0.5, merge_mlp=True)
    _, plain = _grads(model, inputs)
    model.enable_gradient_checkpointing()
    _, ckpt = _grads(model, inputs)
    assert torch.equal(plain, ckpt)


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_reentrant_checkpointing_replays_tome_sd_draws(kind):
    """The reentrant variant recomputes on detached copies of the inputs: the call is found
    through the checkpoint function, not the tensors. Other draws would differ by ~1e-2."""
    model = model_of(kind).train()
    inputs = inputs_of(model, kind, h=16, w=24)
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, seed=2)
    _, ref = _grads(model, inputs)
    model.enable_gradient_checkpointing(functools.partial(checkpoint, use_reentrant=True))
    x = "sample" if kind == "tiny-sd" else "hidden_states"
    inputs[x].requires_grad_(True)  # reentrant checkpoints need a grad-requiring input
    _, got = _grads(model, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_checkpointing_with_a_user_generator_leaves_it_as_an_unchecked_run_does():
    unet = model_of("tiny-sd").train()
    g = torch.Generator().manual_seed(11)
    atc_patch.apply_patch(unet, method="tome_sd", ratio=0.5, generator=g, max_downsample=2)
    inputs = inputs_of(unet, "tiny-sd", h=16, w=24)
    _, ref = _grads(unet, inputs)
    after_ref = g.get_state()
    g.manual_seed(11)
    unet.enable_gradient_checkpointing()
    _, got = _grads(unet, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(g.get_state(), after_ref)  # backward() drew nothing from g


# ---------------------------------------------------------------------------------------------
# concurrent calls
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux"])
def test_concurrent_calls_with_different_sizes_do_not_interfere(kind):
    model = model_of(kind)
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, seed=0)
    jobs = [inputs_of(model, kind, h=h, w=w, seed=i)
            for i, (h, w) in enumerate([(16, 16), (16, 24), (24, 8)])]  # fmt: skip
    expected = [run(model, j) for j in jobs]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for _ in range(3):
                assert torch.equal(run(model, jobs[i]), expected[i])
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


# ---------------------------------------------------------------------------------------------
# torch.compile (the contract test runs every family and method with aot_eager)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["atc", "tome_sd"])
def test_inductor_compiled_unet_matches_eager_across_timesteps(method):
    torch._dynamo.reset()
    unet = model_of("tiny-sd")
    inputs = inputs_of(unet, "tiny-sd")
    atc_patch.apply_patch(
        unet, method=method, ratio=0.5, **({"seed": 3} if method == "tome_sd" else {})
    )
    compiled = torch.compile(unet, backend="inductor", fullgraph=True)
    for t in (10.0, 500.0):  # tome_sd's destinations change with the timestep
        step = with_timestep(inputs, t)
        torch.testing.assert_close(run(compiled, step), run(unet, step), atol=1e-5, rtol=1e-4)


def test_compiled_flux_tome_sd_follows_the_timestep_and_needs_a_square_grid():
    torch._dynamo.reset()
    model = model_of("tiny-flux")
    atc_patch.apply_patch(model, method="tome_sd", ratio=0.5, seed=3)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    inputs = inputs_of(model, "tiny-flux", h=8, w=8)
    for t in (0.5, 0.3):
        step = with_timestep(inputs, t)
        torch.testing.assert_close(run(compiled, step), run(model, step), atol=1e-5, rtol=1e-4)
    with pytest.raises(Exception, match="not a square grid"):
        run(compiled, inputs_of(model, "tiny-flux", h=12, w=8))


# ---------------------------------------------------------------------------------------------
# meta: the families read no data (the kernel's shape-only plans stand in here)
# ---------------------------------------------------------------------------------------------
def _shape_only_kernel(kernel):
    def cluster(metric, r, method="atc", **kw):
        if not metric.is_meta:
            return kernel(metric, r, method, **kw)
        b, n, _ = metric.shape
        cap = max_reduction(method, n)
        if method == "tome_sd":
            grid = kw.get("grid") or (kw["h"], kw["w"])
            window = (kw.get("st") or 1, kw["sy"], kw["sx"])[3 - len(grid) :]
            cap = n - math.prod(g // s for g, s in zip(grid, window))
        labels = torch.empty(b, n, dtype=torch.long, device="meta")
        return MergePlan(labels, n - min(r, cap), validate=False)

    return cluster


@pytest.mark.parametrize("kind", ["tiny-sd", "tiny-flux", "tiny-pixart"])
@pytest.mark.parametrize("method", METHODS)
def test_meta_forward_reads_no_data_in_the_family(kind, method, monkeypatch):
    monkeypatch.setattr(core, "cluster_tokens", _shape_only_kernel(core.cluster_tokens))
    model = model_of(kind)
    inputs = inputs_of(model, kind, h=16, w=24 if kind != "tiny-pixart" else 16)
    atc_patch.apply_patch(model, method, ratio=0.5, merge_mlp=True)
    shape = run(model, inputs).shape
    meta = copy.deepcopy(model).to("meta")
    inputs = {k: v.to("meta") if torch.is_tensor(v) else v for k, v in inputs.items()}
    out = run(meta, inputs)
    assert out.device.type == "meta" and out.shape == shape
