.PHONY: install test test-fast quality style bench

install:
	python -m pip install torch==2.13.0 && python -m pip install -e ".[dev]"

test:
	python -m pytest -q

test-fast:
	python -m pytest -q -m "not integration"

quality:
	ruff check optimum_mosaic tests benchmarks
	@for f in $$(git ls-files '*.py'); do n=$$(wc -l < $$f); [ $$n -le 400 ] || { echo "$$f: $$n lines (> 400)"; exit 1; }; done

style:
	ruff format optimum_mosaic tests benchmarks && ruff check --fix optimum_mosaic tests benchmarks

bench:
	python benchmarks/allocation_table.py
