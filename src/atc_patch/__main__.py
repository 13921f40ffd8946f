"""``python -m atc_patch``: run the demo (see :mod:`atc_patch.demo`)."""

from .demo import main

if __name__ == "__main__":
    main()
