"""The reference README's two benchmark commands run here as written.

``benchmark_merging_method.py`` is ``benchmarks/throughput.py`` and ``benchmark_atc_framework.py``
is ``benchmarks/cluster_kernels.py``: each test parses the README's flags verbatim, then runs them
with fewer runs, batch sizes and pixels appended (later flags win in argparse).
"""

from __future__ import annotations

import csv
import importlib.util
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
README = ROOT.parent / "shared" / "reference" / "ATC_official_README.md"

# The README's commands, verbatim (checked against the README itself where it is at hand).
COMMANDS = {
    "benchmark_merging_method.py": "--output_dir <path_to_output_folder >--model "
    "atc_small_patch16_224 --input_size 224 --runs 2000 --throw_out 0.25 --reduction_ratio 0.5 "
    "--batch_sizes 0 1 2 3 4 5 6 7 8 9 10 --linkage complete",
    "benchmark_atc_framework.py": "--output_dir <path_to_output_folder> --framework sklearn "
    "--input_sizes 224 256 --emb_size 64 --runs 1000 --throw_out 0.25 --reduction_ratio 0.25 "
    "--batch_sizes 0 1 2 3 4 5 6 7 8 9 10 --linkage complete",
}


def readme_argv(script: str, output_dir: Path) -> list[str]:
    """The README's flags for ``script``, with the output folder filled in. The README has a
    typo (``<path_to_output_folder >--model``) that a shell splits as ``... >--model``; the
    placeholder is replaced the way a user would, by a path."""
    text = COMMANDS[script]
    if README.exists():
        lines = [ln for ln in README.read_text().splitlines() if ln.startswith(script)]
        assert lines and lines[0].split(None, 1)[1].strip() == text
    text = text.replace("<path_to_output_folder >", "<path_to_output_folder> ")
    return [str(output_dir) if a == "<path_to_output_folder>" else a for a in shlex.split(text)]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_readme_throughput_command(tmp_path) -> None:
    bench = _load("throughput.py")
    argv = readme_argv("benchmark_merging_method.py", tmp_path)
    args = bench.parse_args(argv)
    assert args.timm_model == "deit_small_patch16_224" and args.method == "atc"
    assert (args.keep_rate, args.reduction_loc, args.linkage) == (0.5, [3, 6, 9], ["complete"])
    assert (args.runs, args.throw_out, args.batch_sizes) == (2000, 0.25, list(range(11)))
    torch.manual_seed(0)
    rows = bench.main([*argv, "--runs", "4", "--batch_sizes", "0", "--input_size", "32"])
    assert [r["config"] for r in rows] == ["unpatched", "tome", "atc(complete)"]
    assert [r["final_tokens"] for r in rows] == [5, 2, 2]  # 4 patches + class; keep 0.5 at 3, 6
    assert (tmp_path / "throughput_atc_small_patch16_224.csv").exists()
    with pytest.raises(SystemExit):
        bench.parse_args([*argv, "--throw_out", "1"])  # nothing would be left to time


def test_readme_framework_command(tmp_path) -> None:
    pytest.importorskip("sklearn")
    bench = _load("cluster_kernels.py")
    argv = readme_argv("benchmark_atc_framework.py", tmp_path)
    rows = bench.main(
        [*argv, "--runs", "4", "--batch_sizes", "0", "--input_sizes", "64", "--no_plot"]
    )
    (row,) = rows
    assert (row["tokens"], row["batch"], row["clusters"], row["linkage"]) == (16, 1, 4, "complete")
    assert row["sklearn_ms"] > 0
    with open(tmp_path / "cluster_kernels.csv") as f:
        assert next(csv.DictReader(f))["linkage"] == "complete"


def test_throw_out_is_the_fraction_of_runs_discarded() -> None:
    bench = _load("cluster_kernels.py")
    calls: list[int] = []
    times = bench.time_calls({"f": lambda: calls.append(1)}, runs=8, throw_out=0.25)
    assert len(calls) == 8 and len(times["f"]) == 6
    times = bench.time_calls({"f": lambda: None}, runs=3, throw_out=0.0)
    assert len(times["f"]) == 3
