# ffcl-monai: every target sets up .venv first (scripts/setup_venv.sh; torch: see TORCH_SPEC / TORCH_INDEX_URL there).
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data
DEMO   ?= runs/demo
PYTEST_ARGS ?=
MODEL  ?= $(DEMO)/finetune/models/model.pt
PORT   ?= 8000

.PHONY: setup test test-slow test-all demo bench label-env label-server test-label clean help

help:
	@echo "make setup        create/reuse .venv and install the project (CPU torch unless a GPU is found)"
	@echo "make demo         FFCL/classification demo on the embedded Kermany sample (<10 min on 2 CPU cores)"
	@echo "make test         fast test suite (<15 min on 2 cores)"
	@echo "make test-slow    slower checks (real-data smoke runs, longer trainings)"
	@echo "make bench        python -m ffcl_monai.bench all"
	@echo "make label-env    separate MONAI Label 0.8.5 environment (.label-venv)"
	@echo "make label-server STUDIES=folder [PORT=8000]   serve the classifier through MONAI Label"
	@echo "make test-label   MONAI Label end-to-end test (real server, real HTTP)"

setup:
	@VENV=$(VENV) bash scripts/setup_venv.sh

test: setup
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow --durations=15 $(PYTEST_ARGS)

test-all: test test-slow test-label

demo: setup
	$(PY) -m ffcl_monai.demo --output-dir $(DEMO)

bench: setup
	$(PY) -m ffcl_monai.bench all --data-root $(DATA)

label-env: setup
	bash monailabel_app/setup_env.sh

label-server: label-env
	@test -n "$(STUDIES)" || { echo "usage: make label-server STUDIES=folder [PORT=8000] [MODEL=runs/demo/finetune/models/model.pt]"; exit 2; }
	LABEL_MODEL=$(MODEL) bash monailabel_app/start_server.sh $(STUDIES) $(PORT)

test-label: label-env
	.label-venv/bin/python -m pytest -q -m label tests/label $(PYTEST_ARGS)

clean:
	rm -rf runs bench_results .pytest_cache
