# DeepHEMNMA: two commands from a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: setup demo test lint report dag clean

$(BIN)/deephemnma: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/deephemnma

demo: setup
	$(BIN)/snakemake --cores $(CORES) --printshellcmds
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

report: setup
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check workflow tests bench
	$(BIN)/ruff format --check workflow tests bench
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

dag: setup
	@command -v dot >/dev/null || { echo "make dag needs graphviz: apt-get install graphviz"; exit 1; }
	mkdir -p results/dag
	$(BIN)/snakemake --rulegraph | dot -Tsvg > results/dag/rulegraph.svg
	$(BIN)/snakemake --rulegraph | dot -Tpng > results/dag/rulegraph.png
	$(BIN)/snakemake --dag | dot -Tsvg > results/dag/dag.svg

clean:
	rm -rf results .snakemake
