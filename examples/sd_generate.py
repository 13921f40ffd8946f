"""Generate images with a diffusion pipeline, token-reduced by ATC or ToMe-SD (atc_patch).

The counterpart of the ATC paper's ``sd_generate.py``, for Stable Diffusion UNets and the
diffusion transformers (Flux, SD3, PixArt, DiT). Offline by default: ``--model_id tiny-sd``
(the default), ``tiny-sdxl``, ``tiny-flux``, ``tiny-sd3``, ``tiny-pixart`` or ``tiny-dit``
build a tiny random-init pipeline in memory, so the script runs end to end anywhere (the
images are noise).
Any other ``--model_id`` (a Hub id or a local folder) loads real weights where you have them.

    python examples/sd_generate.py --merge_fn_str atc --linkage average --reduction_ratio 0.5
    python examples/sd_generate.py --model_id tiny-flux --merge_fn_str tome_sd --steps 4
    python examples/sd_generate.py --merge_fn_str atc --tile 16 16 --plan_scope resolution \
        --reuse_steps 4                         # the GPU settings (docs/diffusers.md)
    python examples/sd_generate.py --model_id runwayml/stable-diffusion-v1-5 --device cuda \\
        --merge_fn_str tome_sd --reduction_ratio 0.5 --prompts prompts.txt --output_dir out/
    # one shard of the prompt list per process (each rank writes its own images)
    torchrun --nproc_per_node 4 examples/sd_generate.py --model_id black-forest-labs/FLUX.1-dev \\
        --fp16 --prompts prompts.txt --output_dir out/

``--prompts`` is a text file with one prompt per line (DiT: a class name of the pipeline's
``id2label``, or a class index). Image ``i`` (prompt ``i // images_per_prompt``, seed
``seed + i``) is saved as ``<output_dir>/<i:05d>.png``. Under ``torchrun`` (``RANK`` /
``WORLD_SIZE`` set) rank ``k`` makes the images with ``i % WORLD_SIZE == k`` on device
``cuda:LOCAL_RANK``. The folder is resumable: images already there are skipped, so a rerun
(with any number of processes) finishes what is missing and gives the same images.

The reduction flags mean what the reference script's mean: ``--merge_fn_str tome`` is ToMe-SD
(the reference's ``tome``, the same as ``tome_sd``), whose destinations are the top-left token
of each window unless ``--use_rand`` (then drawn per call from ``--seed``; the reference forks
one generator from the global RNG instead). docs/pretrained.md ("Fidelity") compares the
patch with the reference's ``SD_setup/token_reduc_sd``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import atc_patch
from atc_patch.testing import PIPELINE_KINDS as TINY
from atc_patch.testing import build_tiny_pipeline, tiny_pipeline_call_kwargs

MERGE_FNS = ("none", "atc", "tome_sd", "tome", "kmedoids", "dpcknn")
METHOD_OF = {"tome": "tome_sd"}  # the reference script's "tome" is ToMe-SD


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--merge_fn_str", default="atc", choices=MERGE_FNS, help="token reduction")
    p.add_argument("--reduction_ratio", type=float, default=0.5, help="fraction of tokens removed")
    p.add_argument("--linkage", default="average", choices=atc_patch.LINKAGES, help="ATC only")
    p.add_argument(
        "--merge_attn", action=argparse.BooleanOptionalAction, default=True, help="self-attention"
    )
    p.add_argument("--merge_crossattn", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--merge_mlp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument(
        "--use_rand",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ToMe-SD: random destinations (seeded by --seed)",
    )
    p.add_argument("--max_downsample", type=int, default=None, help="UNets: default highest attn")
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="DiTs: default all blocks")
    p.add_argument("--metric_dim", type=int, default=None, help="DiTs: projected metric width")
    p.add_argument(
        "--tile", type=int, nargs=2, default=None, help="th tw: cluster in local token tiles"
    )
    p.add_argument("--plan_scope", default=None, choices=("block", "resolution"))
    p.add_argument("--reuse_steps", type=int, default=None, help="keep plans for k steps")
    p.add_argument("--merge", default=None, choices=("tokens", "kv"), help="tokens or keys/values")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line")
    p.add_argument("--images_per_prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--height", type=int, default=None, help="pixels; default: the pipeline's")
    p.add_argument("--width", type=int, default=None, help="pixels; default: the pipeline's")
    p.add_argument("--output_dir", type=Path, default=Path("sd_outputs"))
    p.add_argument("--model_id", default="tiny-sd", help=f"{', '.join(TINY)} or Hub id/folder")
    p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK) if present")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if args.images_per_prompt < 1 or args.steps < 1:
        p.error("--images_per_prompt and --steps must be >= 1")
    return args


def shard() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not 0 <= rank < world:
        raise SystemExit(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def load_pipeline(args: argparse.Namespace):
    """The pipeline to patch: a tiny random-init one or real weights from ``--model_id``."""
    if args.model_id in TINY:
        pipe = build_tiny_pipeline(args.model_id, seed=args.seed)
    else:
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if args.fp16 else torch.float32
        pipe = DiffusionPipeline.from_pretrained(args.model_id, torch_dtype=dtype)
    if args.model_id in TINY and args.model_id != "tiny-dit":
        args.height = args.height or 128
        args.width = args.width or 128
    return pipe.to(args.device)


def patch_options(args: argparse.Namespace, pipe) -> dict:
    """The ``apply_patch`` options the command line sets (family-specific ones only if given)."""
    opts = dict(
        ratio=args.reduction_ratio,
        merge_attn=args.merge_attn,
        merge_mlp=args.merge_mlp,
    )
    if METHOD_OF.get(args.merge_fn_str, args.merge_fn_str) == "tome_sd":
        opts["use_rand"] = args.use_rand
        if args.use_rand:  # seeds its random destinations; no other method draws
            opts["seed"] = args.seed
    if args.merge_fn_str == "atc":
        opts["linkage"] = args.linkage
    if args.merge_crossattn:
        opts["merge_crossattn"] = True
    for name in (
        "max_downsample",
        "blocks",
        "metric_dim",
        "tile",
        "plan_scope",
        "reuse_steps",
        "merge",
    ):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if getattr(pipe, "unet", None) is not None:  # UNets: the cross-attention flag is explicit
        opts["merge_crossattn"] = args.merge_crossattn
    return opts


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        lines = args.prompts.read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if prompts:
        return prompts
    return ["0"] if args.model_id == "tiny-dit" else ["A high quality photograph of a dog."]


def generate(pipe, args: argparse.Namespace, prompt: str, generator: torch.Generator):
    """One image for ``prompt`` (DiT: a class name or index)."""
    kw: dict = dict(num_inference_steps=args.steps, generator=generator)
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if args.model_id in TINY:
        kw.update(tiny_pipeline_call_kwargs(args.model_id))
    if hasattr(pipe, "get_label_ids"):  # DiT: class-conditional
        label = int(prompt) if prompt.isdigit() else pipe.get_label_ids([prompt])[0]
        return pipe(class_labels=[label], **kw).images[0]
    return pipe(prompt, height=args.height, width=args.width, **kw).images[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, local = shard()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args)
    if args.merge_fn_str != "none":
        method = METHOD_OF.get(args.merge_fn_str, args.merge_fn_str)
        atc_patch.apply_patch(pipe, method=method, **patch_options(args, pipe))
    print(f"[rank {rank}/{world}] token reduction: {atc_patch.patch_settings(pipe) or 'none'}")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    jobs = [
        (i, prompt)
        for i, prompt in enumerate(
            p for p in read_prompts(args) for _ in range(args.images_per_prompt)
        )
        if i % world == rank
    ]
    made = skipped = 0
    total = 0.0
    for index, prompt in jobs:
        path = args.output_dir / f"{index:05d}.png"
        if path.exists():  # resumable: made by an earlier run
            skipped += 1
            continue
        generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
        start = time.perf_counter()
        image = generate(pipe, args, prompt, generator)
        seconds = time.perf_counter() - start
        total += seconds
        tmp = path.with_name(f".{path.stem}.rank{rank}.png")
        image.save(tmp)
        tmp.replace(path)  # a killed run never leaves a truncated image behind
        print(f"[{index:05d}] {seconds:7.2f} s  {path}  {prompt!r}")
        made += 1
    print(
        f"[rank {rank}/{world}] {made} images, {skipped} already there, "
        f"{total / max(made, 1):.2f} s per image"
    )


if __name__ == "__main__":
    main()
