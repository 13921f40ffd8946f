"""The demo application: every token-reduction method on the digits ViT that ships with the
package, offline. :mod:`~atc_patch.demo.command` is the ``atc-patch`` command,
:mod:`~atc_patch.demo.study` the measuring and reporting it is built from (also used by
``benchmarks/off_the_shelf.py``), :mod:`~atc_patch.demo.digits` the model and its data,
:mod:`~atc_patch.demo.argtypes` the argparse value types of every command-line tool::

    atc-patch --quick --output_dir /tmp/demo        # or: python -m atc_patch
"""

from .command import main, parse_args, run_demo
from .study import (
    KEEP_RATES,
    METHODS,
    QUICK_KEEP_RATES,
    REDUCTION_LOC,
    Result,
    describe_schedule,
    evaluate,
    format_table,
    plot_accuracy,
    plot_clusters,
    run_study,
    time_forward,
    write_csv,
)

__all__ = [
    "KEEP_RATES",
    "METHODS",
    "QUICK_KEEP_RATES",
    "REDUCTION_LOC",
    "Result",
    "describe_schedule",
    "evaluate",
    "format_table",
    "main",
    "parse_args",
    "plot_accuracy",
    "plot_clusters",
    "run_demo",
    "run_study",
    "time_forward",
    "write_csv",
]
