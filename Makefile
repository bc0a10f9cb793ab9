# One-command jobs. Each creates .venv and installs the project when missing; each step's job redoes only what its
# settings and inputs make out of date.
#   make sample    [CONFIG=configs/x.yaml] [RUN=runs/name] [NUM_SAMPLES=1000] [SAMPLE_ARGS="temperature=0.9 ..."]
#   make tokenizer [CONFIG=...] [RUN=...] [ARGS="key=value ..."]
#   make codes | make prior [PRIOR_CONFIG=configs/prior.yaml] [PRIOR_ARGS="..."]
#   make demo      [RUN=...]  the web page over a finished run (http://127.0.0.1:7860)
#   make test        the whole suite (unit tests, then end-to-end runs)
#   make test-fast   the unit tests only (tests/<package>/)
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
# Real test images the FID is computed against (null: the whole split). Inception is the slow part on a CPU, so the
# default chain caps it; on a GPU use FID_REFERENCE=null.
FID_REFERENCE ?= 2000
SAMPLE_ARGS ?=
PYTEST_ARGS ?=
# Test processes, each test file in one of them (--dist loadfile: a file's shared fixtures are made once); each runs
# torch on its share of the cores (tests/conftest.py).
TEST_WORKERS ?= 2

TOKENIZER := $(RUN)/tokenizer
CODES := $(RUN)/codes
PRIOR := $(RUN)/prior
SAMPLES := $(RUN)/samples

.PHONY: setup tokenizer codes prior sample test test-fast clean-run

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) scripts/setup.sh $(VENV) "$(TORCH_SPEC)"
	@touch $@

# Every step is its job, run each time: the job keeps the run-folder rule itself (pipelines/run_folder.py). The same
# settings resume an interrupted step or do nothing; a raised train.max_steps continues training; any other change
# starts the step over with its earlier result moved to <folder>.previous/<time>/.
tokenizer: setup
	$(PY) -m pipelines.train_tokenizer --config $(CONFIG) --output $(TOKENIZER) $(ARGS)

codes: tokenizer
	$(PY) -m pipelines.extract_codes --tokenizer $(TOKENIZER) --output $(CODES)

prior: codes
	$(PY) -m pipelines.train_prior --codes $(CODES) --output $(PRIOR) --config $(PRIOR_CONFIG) $(PRIOR_ARGS)

sample: prior
	$(PY) -m pipelines.sample --tokenizer $(TOKENIZER) --prior $(PRIOR) --output $(SAMPLES) num_samples=$(NUM_SAMPLES) fid_reference_images=$(FID_REFERENCE) $(SAMPLE_ARGS)

# The demo page's tests need its extra, and a real browser for one of them (installed here, skipped without it).
$(VENV)/.installed-demo: $(VENV)/.installed scripts/setup_demo.sh
	scripts/setup_demo.sh $(VENV)
	@touch $@

$(VENV)/.installed-browser: $(VENV)/.installed-demo
	scripts/setup_demo.sh $(VENV) --browser
	@touch $@

test: $(VENV)/.installed $(VENV)/.installed-demo $(VENV)/.installed-browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

clean-run:
	rm -rf $(RUN)

# --- the demo page: make demo [RUN=runs/default] [DEMO_ARGS="--host 0.0.0.0 --port 7860"] ---
DEMO_ARGS ?=
.PHONY: demo
demo: $(VENV)/.installed-demo
	$(PY) -m pipelines.demo --run $(RUN) $(DEMO_ARGS)

# --- evaluation ---
#   make eval    [RUN=runs/name] [EVAL_ARGS="num_images=2000 protocol=paper ..."]
#   make compare [CONFIG=configs/x.yaml] [ARGS="models=[vqvae,vqwae] train.max_steps=2000 prior.train.max_steps=500
#                 sample.num_samples=1000 eval.num_images=1000 ..."]   (PRIOR_CONFIG is the prior every model gets)
#                [COMPARE_RUN=runs/compare-other]   (default: runs/compare-<config name>)
#   make sweep   [CONFIG=...] [ARGS="sizes=[512,2048,8192,16384] rivals=2 train.max_steps=1000 eval.rfid_images=500 ..."]
#                [SWEEP_RUN=runs/sweep-other]   (default: runs/sweep-<config name>; the codebook-size sweep)
EVAL_ARGS ?=
COMPARE_RUN ?= runs/compare-$(basename $(notdir $(CONFIG)))
SWEEP_RUN ?= runs/sweep-$(basename $(notdir $(CONFIG)))

.PHONY: eval compare sweep

eval: $(VENV)/.installed
	$(PY) -m pipelines.evaluate --run $(RUN) $(EVAL_ARGS)

compare: $(VENV)/.installed
	$(PY) -m pipelines.compare --config $(CONFIG) --prior-config $(PRIOR_CONFIG) --output $(COMPARE_RUN) $(ARGS)

sweep: $(VENV)/.installed
	$(PY) -m pipelines.sweep --config $(CONFIG) --prior-config $(PRIOR_CONFIG) --output $(SWEEP_RUN) $(ARGS)

# --- benchmarks ---
.PHONY: bench
bench: $(VENV)/.installed
	$(PY) -m benchmarks.run --output runs/bench

# --- result tables: every table in README.md and docs/*.md, from the result files under docs/results/ ---
# The script needs only the standard library, so it runs without the project's environment.
.PHONY: tables
tables:
	$(PYTHON) scripts/results_tables.py
