"""The training/evaluation scripts: the reference README's commands, resume, accumulation, DDP.

Every run is tiny (the shipped digits ViT on a few real digits, or the README's models at a
32-pixel input with random weights) and one short epoch.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
import types
from pathlib import Path

import pytest
import timm  # noqa: F401
import torch

from atc_patch.train import CHECKPOINT_KEYS, load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _script(rel: str) -> types.ModuleType:
    name = "_script_" + rel.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / rel)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    make = _script("examples/make_digit_datasets.py")
    make.main(
        ["--output_dir", str(out), "--limit", "40", "--train_mosaics", "16", "--val_mosaics", "8"]
    )
    return out


def digits_flags(data: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        "imagenet",
        "--data",
        str(data / "imagefolder"),
        "--model",
        "atc_digits",
        "--input-size",
        "8",
        "--reduction_loc",
        "1",
        "2",
        "3",
        "--keep_rate",
        "0.5",
        "--linkage",
        "average",
        "--proportional_attn",
        "--num_workers",
        "0",
        "--lr",
        "1e-3",
        "--lr_batch_normalizer",
        "40",
        "--warmup-epochs",
        "1",
        "--no_progress",
        "--device",
        "cpu",
        *extra,
    ]


def train_deit(argv: list[str]) -> dict:
    torch.set_num_threads(1)
    return _script("examples/train_deit.py").main(argv)


class FakeWandb(types.ModuleType):
    """Records what a run sends to wandb."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, row):
        self.logged.append(row)

    def finish(self):
        self.finished += 1


def readme(name: str) -> list[str]:
    """The command of the reference README that runs ``name`` (its flags, split like a shell)."""
    text = ROOT.parent / "shared" / "reference" / "ATC_official_README.md"
    if not text.exists():  # the README commands, verbatim, for runs outside the workspace
        text = None
    commands = {
        "train_deit.py": "--dataset imagenet --data <path_to_data> --batch-size 256 --lr 0.001 "
        "--epochs 30 --warmup-epochs 20 --lr_batch_normalizer 1024 --sched_in_steps --use_amp "
        "--grad_accum_steps 2 --wandb_project <wandb_project> --wandb_group <wandb_group> "
        "--output_dir <path_to_model_output> --model atc_small_patch16_224 --linkage complete "
        "--proportional_attn --reduction_loc 3 6 9 --keep_rate 0.9",
        "train_mae.py": "--data <path_to_data> --batch_size 256 --accum_iter 2 --model "
        "vit_base_patch16 --finetune ./pretrained_models/mae_pretrain_vit_base.pth --epochs 100 "
        "--blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 "
        "--mixup 0.8 --cutmix 1.0 --dist_eval --wandb_project <wandb_project> --wandb_group "
        "<wandb_group> --output_dir <path_to_model_output> --merge_fn atc --r-count 16 "
        "--r-sched constant --linkage average",
        "validate_ots_sslbackbone.py": "--data <path_to_data> --batch_size 256 --model-type swag "
        "--model-name vit_base_patch16 --input-size 384 --r 0 5 10 15 20 25 30 35 40 45 "
        "--merge_fn atc --linkage single --r-sched decrease",
    }
    if text is not None:  # check the copy above against the README itself
        lines = [ln for ln in text.read_text().splitlines() if ln.startswith(name)]
        assert lines and lines[0].split(None, 1)[1].strip() == commands[name]
    return shlex.split(commands[name])


def substitute(argv: list[str], **paths: str) -> list[str]:
    return [paths.get(a.strip("<>"), a) for a in argv]


def test_readme_deit_command(data, tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    argv = substitute(
        readme("train_deit.py"),
        path_to_data=str(data / "imagefolder"),
        path_to_model_output=str(tmp_path / "out"),
        wandb_project="p",
        wandb_group="g",
    )
    # Tiny run: random weights (offline), a 32-pixel input, one epoch of 8-image batches.
    argv += [
        "--no-pretrained",
        "--input-size",
        "32",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--no_progress",
        "--stop_epoch",
        "1",
    ]
    res = train_deit(argv)
    import atc_patch

    settings = atc_patch.patch_settings(res["model"])
    assert settings["method"] == "atc" and settings["linkage"] == "complete"
    assert settings["keep_rate"] == 0.9 and tuple(settings["reduction_loc"]) == (3, 6, 9)
    assert res["args"].lr == pytest.approx(0.001 * 8 * 2 / 1024)  # lr scaled by the total batch
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    assert list(ckpt) == list(CHECKPOINT_KEYS) and ckpt["epoch"] == 0
    assert ckpt["model_ema"] is not None and ckpt["args"].model == "atc_small_patch16_224"
    assert wandb.inits[0]["project"] == "p" and wandb.inits[0]["group"] == "g"
    assert wandb.logged[-1]["epoch"] == 0 and wandb.finished == 1
    lines = (tmp_path / "out" / "log.txt").read_text().splitlines()
    assert len(lines) == 2 and (tmp_path / "out" / "log.csv").exists()
    # validate.py rebuilds the model from the checkpoint's args and scores what training did.
    val = _script("examples/validate.py").main(
        [
            "--data",
            str(data / "imagefolder"),
            "--checkpoint",
            str(tmp_path / "out" / "checkpoint.pth"),
            "--output_dir",
            str(tmp_path / "val"),
            "-j",
            "0",
            "--device",
            "cpu",
            "--no_progress",
            "--use_amp",  # as trained: bf16 on the CPU
        ]
    )
    key = "ema_val_acc1" if ckpt["ema_best"] else "val_acc1"
    assert val["Top1-Acc"] == pytest.approx(res["rows"][-1][key], abs=1e-3)
    assert (tmp_path / "val" / "validation.json").exists()


def test_readme_mae_command(data, tmp_path):

    # An MAE-pretrain-style checkpoint ({'model': encoder weights, 224 px, no head}), stored
    # as expanded zeros so the file stays small.
    with torch.device("meta"):  # shapes only
        ref = timm.create_model("vit_base_patch16_224", num_classes=0, global_pool="avg")
    state = {k: torch.zeros(()).expand(v.shape) for k, v in ref.state_dict().items()}
    torch.save({"model": state}, tmp_path / "mae_pretrain_vit_base.pth")
    argv = [a for a in readme("train_mae.py")]
    for flag in ("--wandb_project", "--wandb_group"):  # wandb: see the DeiT test
        i = argv.index(flag)
        del argv[i : i + 2]
    argv = substitute(
        argv, path_to_data=str(data / "imagefolder"), path_to_model_output=str(tmp_path / "out")
    )
    argv[argv.index("./pretrained_models/mae_pretrain_vit_base.pth")] = str(
        tmp_path / "mae_pretrain_vit_base.pth"
    )
    argv += [
        "--input_size",
        "32",
        "--batch_size",
        "20",
        "--epochs",
        "1",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--no_progress",
        "--r-count",
        "1",
    ]
    torch.set_num_threads(1)
    res = _script("examples/train_mae.py").main(argv)
    model, opt = res["model"], res["optimizer"]
    assert model.pos_embed.shape == (1, 5, 768)  # resampled from 14x14 to 2x2
    scales = sorted({round(g["lr_scale"], 6) for g in opt.param_groups})
    assert scales == sorted({round(0.65 ** (13 - i), 6) for i in range(14)})
    assert res["args"].lr == pytest.approx(5e-4 * 20 * 2 / 256)
    assert not torch.equal(model.head.weight, torch.zeros_like(model.head.weight))
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pth")["epoch"] == 0


def test_readme_off_the_shelf_command(data, tmp_path):
    argv = substitute(readme("validate_ots_sslbackbone.py"), path_to_data=str(data / "imagefolder"))
    argv += [
        "--no-pretrained",
        "--input-size",
        "32",
        "--num_images",
        "8",
        "--workers",
        "0",
        "--results-dir",
        str(tmp_path),
        "--no_progress",
        "--device",
        "cpu",
    ]
    torch.set_num_threads(1)
    rows = _script("benchmarks/off_the_shelf.py").reference_study(
        _script("benchmarks/off_the_shelf.py").parse_args(argv)
    )
    assert [r["r"] for r in rows] == list(range(0, 50, 5))
    csv_path = tmp_path / "decrease" / "swag_vit_base_patch16_32_atc_single.csv"
    assert csv_path.read_text().splitlines()[0].startswith("Model;Img_Size;r;Top-1;Top-5")


def test_off_the_shelf_augreg_builds_the_model_at_input_size(data, tmp_path):
    """--model-type augreg builds timm's model at --input-size, as swag and mae do (before, the
    model kept its 224 px and a 32 px evaluation crashed)."""
    argv = [
        "--data",
        str(data / "imagefolder"),
        "--model-type",
        "augreg",
        "--model-name",
        "vit_tiny_patch16_224",
        "--input-size",
        "32",
        "--r",
        "0",
        "1",
        "--merge_fn",
        "atc",
        "--linkage",
        "single",
        "--no-pretrained",
        "--num_images",
        "4",
        "--batch_size",
        "4",
        "--workers",
        "0",
        "--results-dir",
        str(tmp_path),
        "--no_progress",
        "--device",
        "cpu",
    ]
    torch.set_num_threads(1)
    script = _script("benchmarks/off_the_shelf.py")
    rows = script.reference_study(script.parse_args(argv))
    assert [r["r"] for r in rows] == [0, 1]
    csv_path = tmp_path / "constant" / "augreg_vit_tiny_patch16_224_32_atc_single.csv"
    first = csv_path.read_text().splitlines()[1].split(";")
    assert first[:3] == ["vit_tiny_patch16_224", "32", "0"]


@pytest.mark.parametrize("dataset", ["coco", "nuswide"])
def test_multilabel_step(data, dataset):
    res = train_deit(
        [
            "--dataset",
            dataset,
            "--data",
            str(data / dataset),
            "--model",
            "tome_digits",
            "--input-size",
            "16",
            "--reduction_loc",
            "1",
            "--keep_rate",
            "0.5",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--num_workers",
            "0",
            "--no_progress",
            "--device",
            "cpu",
            "--no-model-ema",
            "--aa",
            "rand-m9-mstd0.5-inc1",
            "--output_dir",
            "",
        ]
    )
    rows = res["rows"]
    assert "val_mAP" in rows[-1] and 0 <= rows[-1]["val_mAP"] <= 100
    assert res["model"].pos_embed.shape == (1, 257, 64)  # 8x8 grid resampled to 16x16
    assert rows[-1]["train_loss"] > 0


def _state(res: dict) -> dict:
    out = {f"model.{k}": v for k, v in res["model"].state_dict().items()}
    if res["model_ema"] is not None:
        out.update({f"ema.{k}": v for k, v in res["model_ema"].state_dict().items()})
    return out


def test_two_epochs_and_resume_equal_three(data, tmp_path):
    # One optimizer step per epoch (40 images, batch 40); mixup, random erasing, drop path,
    # EMA and the warm-up/cosine schedule all in play.
    flags = digits_flags(
        data,
        "--batch-size",
        "40",
        "--epochs",
        "3",
        "--model-ema-decay",
        "0.5",
        "--drop-path",
        "0.1",
    )
    full = train_deit(flags + ["--output_dir", str(tmp_path / "a")])
    train_deit(flags + ["--output_dir", str(tmp_path / "b"), "--stop_epoch", "2"])
    resumed = train_deit(
        flags
        + ["--output_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b" / "checkpoint.pth")]
    )
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["rows"][-1]["train_loss"] == resumed["rows"][-1]["train_loss"]
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pth")["epoch"] == 2


def test_grad_accumulation_equals_large_batch(data):
    flags = digits_flags(
        data,
        "--epochs",
        "1",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--reprob",
        "0",
        "--drop-path",
        "0",
        "--no-model-ema",
        "--opt",
        "momentum",  # plain SGD (timm's "sgd" is Nesterov)
        "--momentum",
        "0",
        "--weight-decay",
        "0",
        "--lr",
        "0.5",
        "--warmup-epochs",
        "0",
        "--output_dir",
        "",
    )
    big = train_deit(flags + ["--batch-size", "40"])
    acc = train_deit(flags + ["--batch-size", "20", "--grad_accum_steps", "2"])
    one = train_deit(flags + ["--batch-size", "20"])  # two steps: must differ
    a, b, c = _state(big), _state(acc), _state(one)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def _ddp_rank(rank: int, init: str, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    try:
        res = train_deit(
            digits_flags(
                Path(data),
                "--batch-size",
                "10",
                "--epochs",
                "1",
                "--dist_url",
                f"file://{init}",
                "--dist_eval",
                "--output_dir",
                "",
            )
        )
        torch.save(res["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))
        torch.save(res["rows"], os.path.join(out, f"rows{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_ranks_leave_equal_parameters(data, tmp_path):
    torch.multiprocessing.start_processes(
        _ddp_rank,
        args=(str(tmp_path / "init"), str(data), str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    p0, p1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    rows0, rows1 = (torch.load(tmp_path / f"rows{r}.pt") for r in (0, 1))
    assert rows0[-1]["val_num_images"] == 40  # --dist_eval gathered both shards
    assert rows0[-1]["val_acc1"] == rows1[-1]["val_acc1"]
    start = torch.load(tmp_path / "rank0.pt")
    assert start.keys() == p0.keys()


def test_bad_input_messages(data, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="atc_small_patch16_224"):
        train_deit(digits_flags(data)[: -0 or None] + ["--model", "atc_huge_patch16_224"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(SystemExit, match="pip install wandb"):
        train_deit(digits_flags(data, "--epochs", "1", "--wandb_project", "p", "--output_dir", ""))
    from atc_patch.train import LayoutError

    with pytest.raises(LayoutError, match="nus_wid_data.csv"):
        train_deit(digits_flags(data, "--dataset", "nuswide", "--data", str(tmp_path)))


def test_deit_hard_distillation(data, tmp_path):
    import torch.nn.functional as F

    from atc_patch.train.engine import DistillationLoss

    teacher = timm.create_model("resnet10t", num_classes=10)
    torch.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    # The loss: (1 - alpha) CE(class head) + alpha CE(distillation head, teacher argmax).
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    cls, dist = torch.randn(4, 10), torch.randn(4, 10)
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher.eval(), "hard", 0.3)
    with torch.no_grad():
        want = 0.7 * F.cross_entropy(cls, y) + 0.3 * F.cross_entropy(dist, teacher(x).argmax(1))
    torch.testing.assert_close(loss(x, (cls, dist), y), want)
    res = train_deit(
        digits_flags(data, "--epochs", "1", "--batch-size", "20", "--output_dir", "")[:4]
        + [
            "--model",
            "tome_tiny_patch16_224",
            "--no-pretrained",
            "--input-size",
            "32",
            "--reduction_loc",
            "3",
            "--keep_rate",
            "0.75",
            "--num_workers",
            "0",
            "--epochs",
            "1",
            "--batch-size",
            "20",
            "--device",
            "cpu",
            "--no_progress",
            "--output_dir",
            "",
            "--distillation-type",
            "hard",
            "--teacher-model",
            "resnet10t",
            "--teacher-path",
            str(tmp_path / "teacher.pth"),
        ]
    )
    assert res["model"].dist_token is not None  # the distilled DeiT
    assert res["rows"][-1]["train_loss"] > 0


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_flags_are_read_weights_only(data, tmp_path, monkeypatch):
    """--teacher-path (also https://, read from torch's hub cache as torch.hub would),
    --finetune and --resume go through the one weights-only reader: a pickled os.system is
    refused with its name and never runs."""
    import argparse

    from atc_patch.pretrained import UnsafeCheckpointError
    from atc_patch.train.recipe import build_teacher

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "executed"
    teacher = timm.create_model("resnet10t", num_classes=10)
    evil = {"model": teacher.state_dict(), "payload": _Evil(str(marker))}
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(evil, cache / "regnety_teacher.pth")
    torch.save(evil, tmp_path / "x")
    env = argparse.Namespace(device=torch.device("cpu"))
    for path in ("https://example.com/regnety_teacher.pth", str(tmp_path / "x")):
        args = argparse.Namespace(
            distillation_type="hard", teacher_model="resnet10t", teacher_path=path
        )
        with pytest.raises(UnsafeCheckpointError, match="system"):
            build_teacher(args, 10, env)
    for flag in ("--finetune", "--resume"):
        argv = digits_flags(data, "--epochs", "1", "--output_dir", "", flag, str(tmp_path / "x"))
        with pytest.raises(UnsafeCheckpointError, match="system"):
            train_deit(argv)
    assert not marker.exists()


def test_registry_model_checkpoint_loads_with_load_pretrained(data, tmp_path, monkeypatch):
    """--model atc_tiny_patch16_224 is built by the timm registry, as timm's scripts would; the
    run's checkpoint loads with atc_patch.load_pretrained into the same model (same logits)."""

    import atc_patch

    calls = []
    create = timm.create_model

    def spy(name, *args, **kwargs):
        calls.append((name, kwargs))
        return create(name, *args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    flags = digits_flags(data)
    flags = flags[: flags.index("--input-size")] + [
        "--model",
        "atc_tiny_patch16_224",
        "--no-pretrained",
        "--input-size",
        "32",
        "--reduction_loc",
        "1",
        "2",
        "--keep_rate",
        "0.5",
        "--linkage",
        "single",
        "--proportional_attn",
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--model-ema-decay",
        "0.5",
        "--num_workers",
        "0",
        "--no_progress",
        "--device",
        "cpu",
        "--output_dir",
        str(tmp_path),
    ]
    res = train_deit(flags)
    name, kwargs = calls[0]
    assert name == "atc_tiny_patch16_224.fb_in1k"  # fine-tuning starts from DeiT, not a release
    expected = dict(linkage="single", keep_rate=0.5, reduction_loc=(1, 2), proportional_attn=True)
    assert {k: kwargs[k] for k in expected} == expected
    assert kwargs["num_classes"] == 10 and kwargs["img_size"] == 32
    assert res["model"].pretrained_cfg["architecture"] == "atc_tiny_patch16_224"
    monkeypatch.setattr(timm, "create_model", create)

    path = tmp_path / "checkpoint.pth"
    ckpt = load_checkpoint(path)
    assert list(ckpt) == list(CHECKPOINT_KEYS)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trained = {False: res["model"].eval(), True: res["model_ema"].eval()}
    with torch.no_grad():
        assert not torch.equal(trained[False](x), trained[True](x))  # EMA != weights
        for ema in (None, False, True):
            loaded = atc_patch.load_pretrained(path, ema=ema)
            want = trained[ckpt["ema_best"] if ema is None else ema]
            assert atc_patch.patch_settings(loaded) == atc_patch.patch_settings(want)
            assert torch.equal(loaded(x), want(x))
