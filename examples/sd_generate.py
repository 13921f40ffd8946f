"""Generate images with Stable Diffusion, token-reduced by ATC or ToMe-SD (atc_patch).

The counterpart of the ATC paper's ``sd_generate.py``. Offline by default: without
``--model_id`` it builds a tiny random-init pipeline in memory (UNet, VAE, CLIP text encoder and
tokenizer), so the script runs end to end anywhere (the images are noise). With ``--model_id``
it loads real weights (a Hub id or a local folder) where you have them.

    python examples/sd_generate.py --merge_fn_str atc --linkage average --reduction_ratio 0.5
    python examples/sd_generate.py --model_id runwayml/stable-diffusion-v1-5 --device cuda \\
        --merge_fn_str tome_sd --reduction_ratio 0.5 --prompts prompts.txt --output_dir out/

``--prompts`` is a text file with one prompt per line. Images are saved as
``<output_dir>/<index:05d>.png`` and the time of every image is printed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import atc_patch

MERGE_FNS = ("none", "atc", "tome_sd", "tome", "kmedoids", "dpcknn")


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
    p.add_argument("--max_downsample", type=int, default=None, help="default: highest attn level")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, default=None, help="file with one prompt per line")
    p.add_argument("--images_per_prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--height", type=int, default=None, help="pixels; default 512 (tiny: 128)")
    p.add_argument("--width", type=int, default=None, help="pixels; default 512 (tiny: 128)")
    p.add_argument("--output_dir", type=Path, default=Path("sd_outputs"))
    p.add_argument("--model_id", default=None, help="Hub id or folder; default: tiny offline")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    return p.parse_args(argv)


def load_pipeline(args: argparse.Namespace):
    """The pipeline to patch: real weights from ``--model_id`` or a tiny random-init one."""
    if args.model_id is None:
        from atc_patch.sd_models import build_tiny_pipeline

        size = 128
        pipe = build_tiny_pipeline(seed=args.seed)
    else:
        from diffusers import AutoPipelineForText2Image

        dtype = torch.float16 if args.fp16 else torch.float32
        pipe = AutoPipelineForText2Image.from_pretrained(args.model_id, torch_dtype=dtype)
        size = 8 * pipe.unet.config.sample_size
    args.height = args.height or size
    args.width = args.width or size
    return pipe.to(args.device)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        lines = args.prompts.read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts or ["A high quality photograph of a golden retriever."]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = load_pipeline(args)
    if args.merge_fn_str != "none":
        atc_patch.apply_patch(
            pipe,
            method=args.merge_fn_str,
            ratio=args.reduction_ratio,
            linkage=args.linkage if args.merge_fn_str == "atc" else None,
            max_downsample=args.max_downsample,
            merge_attn=args.merge_attn,
            merge_crossattn=args.merge_crossattn,
            merge_mlp=args.merge_mlp,
            seed=args.seed,
        )
    print(f"token reduction: {atc_patch.patch_settings(pipe) or 'none'}")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    index = 0
    total = 0.0
    for prompt in read_prompts(args):
        for _ in range(args.images_per_prompt):
            generator = torch.Generator(device="cpu").manual_seed(args.seed + index)
            start = time.perf_counter()
            image = pipe(
                prompt,
                height=args.height,
                width=args.width,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                generator=generator,
            ).images[0]
            seconds = time.perf_counter() - start
            total += seconds
            path = args.output_dir / f"{index:05d}.png"
            image.save(path)
            print(f"[{index:05d}] {seconds:7.2f} s  {path}  {prompt!r}")
            index += 1
    print(f"{index} images, {total / max(index, 1):.2f} s per image")


if __name__ == "__main__":
    main()
