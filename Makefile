# One-command jobs. Each creates .venv and installs the project when missing; each step is a file target, so
# re-running redoes only what is out of date.
#   make sample    [CONFIG=configs/x.yaml] [RUN=runs/name] [NUM_SAMPLES=1000] [SAMPLE_ARGS="temperature=0.9 ..."]
#   make tokenizer [CONFIG=...] [RUN=...] [ARGS="key=value ..."]
#   make codes | make prior [PRIOR_CONFIG=configs/prior.yaml] [PRIOR_ARGS="..."]
#   make test        the whole suite (unit tests, then end-to-end runs; a few minutes on 2 CPU cores)
#   make test-fast   the unit tests only (tests/<package>/, about a minute)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This pair is what the project is tested with; elsewhere pass e.g. TORCH_SPEC="torch torchvision" for your own build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/fashion_mnist.yaml
PRIOR_CONFIG ?= configs/prior.yaml
RUN ?= runs/default
ARGS ?=
PRIOR_ARGS ?=
NUM_SAMPLES ?= 1000
# Real test images the FID is computed against (null: the whole split). Inception runs at ~10 images/s on 2 CPU
# cores, so the default chain caps it; on a GPU use FID_REFERENCE=null.
FID_REFERENCE ?= 2000
SAMPLE_ARGS ?=
PYTEST_ARGS ?=

TOKENIZER := $(RUN)/tokenizer
CODES := $(RUN)/codes
PRIOR := $(RUN)/prior
SAMPLES := $(RUN)/samples

.PHONY: setup tokenizer codes prior sample test test-fast clean-run FORCE
# A recipe that fails leaves no target behind (each job also writes its target last, atomically).
.DELETE_ON_ERROR:

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) scripts/setup.sh $(VENV) "$(TORCH_SPEC)"
	@touch $@

# The settings a step was made with; rewritten only when they change, so a changed config or ARGS redoes the step.
%/make_args.txt: FORCE
	@mkdir -p $(@D)
	@echo '$(STEP_ARGS)' | cmp -s - $@ || echo '$(STEP_ARGS)' > $@

$(TOKENIZER)/make_args.txt: STEP_ARGS = $(CONFIG) $(ARGS)
$(PRIOR)/make_args.txt: STEP_ARGS = $(PRIOR_CONFIG) $(PRIOR_ARGS)
$(SAMPLES)/make_args.txt: STEP_ARGS = $(NUM_SAMPLES) $(FID_REFERENCE) $(SAMPLE_ARGS)

tokenizer: $(TOKENIZER)/model.safetensors

$(TOKENIZER)/model.safetensors: $(VENV)/.installed $(CONFIG) $(TOKENIZER)/make_args.txt
	$(PY) -m pipelines.train_tokenizer --config $(CONFIG) --output $(TOKENIZER) train.resume=latest $(ARGS)

codes: $(CODES)/train.safetensors

$(CODES)/train.safetensors: $(TOKENIZER)/model.safetensors
	$(PY) -m pipelines.extract_codes --tokenizer $(TOKENIZER) --output $(CODES)

prior: $(PRIOR)/model.safetensors

$(PRIOR)/model.safetensors: $(CODES)/train.safetensors $(PRIOR_CONFIG) $(PRIOR)/make_args.txt
	$(PY) -m pipelines.train_prior --codes $(CODES) --output $(PRIOR) --config $(PRIOR_CONFIG) train.resume=latest $(PRIOR_ARGS)

sample: $(SAMPLES)/metrics.json

$(SAMPLES)/metrics.json: $(PRIOR)/model.safetensors $(TOKENIZER)/model.safetensors $(SAMPLES)/make_args.txt
	$(PY) -m pipelines.sample --tokenizer $(TOKENIZER) --prior $(PRIOR) --output $(SAMPLES) num_samples=$(NUM_SAMPLES) fid_reference_images=$(FID_REFERENCE) $(SAMPLE_ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-run:
	rm -rf $(RUN)

# --- evaluation (issue 4) ---
#   make eval    [RUN=runs/name] [EVAL_ARGS="num_images=2000 protocol=paper ..."]
#   make compare [CONFIG=configs/x.yaml] [ARGS="models=[vqvae,vqwae] train.max_steps=2000 prior.train.max_steps=500
#                 sample.num_samples=1000 eval.num_images=1000 ..."]   (PRIOR_CONFIG is the prior every model gets)
#                [COMPARE_RUN=runs/compare-other]   (default: runs/compare-<config name>)
EVAL_ARGS ?=
COMPARE_RUN ?= runs/compare-$(basename $(notdir $(CONFIG)))

.PHONY: eval compare

eval: $(VENV)/.installed
	$(PY) -m pipelines.evaluate --run $(RUN) $(EVAL_ARGS)

compare: $(VENV)/.installed
	$(PY) -m pipelines.compare --config $(CONFIG) --prior-config $(PRIOR_CONFIG) --output $(COMPARE_RUN) $(ARGS)

# --- benchmarks (issue 5) ---
.PHONY: bench
bench: $(VENV)/.installed
	$(PY) -m benchmarks.run --output runs/bench
