"""``python -m atc_patch.demo``: run the demo (see :mod:`atc_patch.demo.command`)."""

from .command import main

if __name__ == "__main__":
    main()
