# The two commands of the README. Each bootstraps .venv itself.
PY := .venv/bin/python
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test lint bench-kernels docs docs-serve gallery

demo:
	@bash scripts/bootstrap.sh demo
	$(PY) -m atc_patch

test:
	@bash scripts/bootstrap.sh test
	$(PY) -m ruff check src tests benchmarks examples scripts
	$(PY) -m ruff format --check src tests benchmarks examples scripts
	$(PY) -m pytest -q -p no:cacheprovider

bench-kernels:
	@bash scripts/bootstrap.sh test
	$(PY) benchmarks/cluster_kernels.py --framework all

# The documentation site, built strictly (any warning fails) into site/.
docs:
	@bash scripts/bootstrap.sh docs
	$(PY) -m mkdocs build --strict -d site

docs-serve:
	@bash scripts/bootstrap.sh docs
	$(PY) -m mkdocs serve

# Redraw the gallery's pictures (docs/gallery/*.png) from the shipped digits model and timings.
gallery:
	@bash scripts/bootstrap.sh test
	$(PY) scripts/gallery.py
