# One-command jobs. Each creates .venv and installs the project when missing.
#   make tokenizer [CONFIG=configs/x.yaml] [RUN=runs/name] [ARGS="key=value ..."]
#   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# This pair is what the project is tested with; elsewhere pass e.g. TORCH_SPEC="torch torchvision" for your own build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/fashion_mnist.yaml
RUN ?= runs/default
ARGS ?=
PYTEST_ARGS ?=

TOKENIZER := $(RUN)/tokenizer

.PHONY: setup tokenizer test clean-run FORCE

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) scripts/setup.sh $(VENV) "$(TORCH_SPEC)"
	@touch $@

# The settings a step was made with; rewritten only when they change, so a changed CONFIG or ARGS redoes the step.
$(TOKENIZER)/make_args.txt: FORCE
	@mkdir -p $(@D)
	@echo '$(CONFIG) $(ARGS)' | cmp -s - $@ || echo '$(CONFIG) $(ARGS)' > $@

tokenizer: $(TOKENIZER)/model.safetensors

$(TOKENIZER)/model.safetensors: $(VENV)/.installed $(CONFIG) $(TOKENIZER)/make_args.txt
	$(PY) -m pipelines.train_tokenizer --config $(CONFIG) --output $(TOKENIZER) train.resume=latest $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-run:
	rm -rf $(RUN)
