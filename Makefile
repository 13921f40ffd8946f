# The two commands of the README. Each bootstraps .venv itself.
PY := .venv/bin/python

.PHONY: demo test lint bench-kernels

demo:
	@bash scripts/bootstrap.sh demo
	$(PY) -m atc_patch

test:
	@bash scripts/bootstrap.sh test
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m pytest -q -p no:cacheprovider

bench-kernels:
	@bash scripts/bootstrap.sh test
	$(PY) benchmarks/cluster_kernels.py --framework all
