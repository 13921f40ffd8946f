"""Train (or fine-tune) an mmdet 3 detector with a token-reduced ViT-Adapter backbone.

A thin wrapper around ``mmengine.runner.Runner`` (what mmdet's ``tools/train.py`` does) that
also accepts the names of the configs packaged in ``atc_patch.mmdet``:

    python examples/train_mmdet.py tomeatc-adapter-t-0.5x-ftune \
        --cfg-options model.backbone.linkage=single model.backbone.reduction_ratio=0.25 \
                      load_from=work_dirs/vit-adapter-t-3x/epoch_36.pth

    python examples/train_mmdet.py my_config.py --work-dir out/ --amp

With torch >= 2.6, loading an mmengine checkpoint (``load_from``, ``--resume``) needs
``--trust-checkpoint``: those files hold numpy arrays and mmengine objects that ``torch.load``'s
default ``weights_only=True`` refuses.
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
from collections.abc import Sequence

from mmengine.config import Config, DictAction
from mmengine.runner import Runner


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="config file, or a name from atc_patch.mmdet.CONFIGS")
    parser.add_argument("--work-dir", help="where logs and checkpoints go")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision")
    parser.add_argument("--resume", action="store_true", help="resume from the latest checkpoint")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config keys, key=value (e.g. model.backbone.reduction_ratio=0.25)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load load_from/--resume checkpoints with torch.load(weights_only=False): "
        "mmengine checkpoints hold numpy arrays and HistoryBuffer objects that torch>=2.6 "
        "refuses to load by default. Only for checkpoints you trust.",
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def resolve_config(name: str) -> str:
    """A config path: ``name`` itself if it is a file, else a packaged config of that name."""
    if osp.isfile(name):
        return name
    from atc_patch.mmdet import config_path

    return config_path(name)


def build_config(argv: Sequence[str] | None = None) -> Config:
    """Load the config, apply ``--cfg-options`` and the command-line switches."""
    return config_from_args(parse_args(argv))


def config_from_args(args: argparse.Namespace) -> Config:
    path = resolve_config(args.config)
    cfg = Config.fromfile(path)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(path))[0])
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    cfg.resume = args.resume or cfg.get("resume", False)
    return cfg


def main(argv: Sequence[str] | None = None) -> Runner:
    """Build the runner from the command line and train; returns the runner."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.trust_checkpoint:  # read by torch.load when the caller leaves weights_only unset
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == "__main__":
    main()
