# neuroseg: `make demo` (synthetic data, whole pipeline) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/kaggle.yaml
DATA_DIR ?= $(or $(NEUROSEG_DATA_DIR),input/sartorius-cell-instance-segmentation)
DEMO_DATA := input/synthetic
ARGS   ?=
RUN     = $(PY) $(1) --config $(CONFIG) --data-dir $(DATA_DIR) $(ARGS)
# glibc keeps freed memory for reuse (up to 1 GB, blocks under 32 MB) instead of handing it back to
# the OS and faulting it in again every step: a CPU training step of cpu.yaml's Mask R-CNN 10 %
# and UPerNet's 35 % faster, page faults halved (bench/bench_train_step.py, BENCHMARKS.md)
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824

.PHONY: venv test demo submission preprocess yolox maskrcnn upernet ensemble predict bench kaggle pseudo clean-output

# The venv is rebuilt when requirements.txt changes; torch first (the local wheel here), yolox last.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation yolox==0.3.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest tests

preprocess: venv
	$(call RUN,01_preprocess.py)
yolox: venv
	$(call RUN,02_train_yolox.py)
maskrcnn: venv
	$(call RUN,03_train_maskrcnn.py)
upernet: venv
	$(call RUN,04_train_upernet.py)
ensemble: venv
	$(call RUN,05_ensemble.py)
submission: preprocess yolox maskrcnn upernet ensemble
	$(call RUN,06_make_submission.py)

# 48 labelled + 6 test images of 256 x 352 px (crops of full-size scenes: cells at their real
# size). The stamp names the arguments, so a dataset made with others is rewritten; its
# test_truth.csv holds the test images' labels, which 01-06 never read.
DEMO_SYNTH := --images 48 --test-images 6 --height 256 --width 352 --seed 0
DEMO_STAMP := $(DEMO_DATA)/.synth$(subst $() ,,$(DEMO_SYNTH))
$(DEMO_STAMP): | venv
	$(PY) -m neuroseg synth $(DEMO_DATA) $(DEMO_SYNTH) --overwrite
	touch $@

# ends with the out-of-sample score: the submission against the test images' labels
demo: venv $(DEMO_STAMP)
	$(MAKE) submission CONFIG=configs/demo.yaml DATA_DIR=$(DEMO_DATA)
	$(PY) -m neuroseg score $(DEMO_DATA)/test_truth.csv $(or $(NEUROSEG_OUTPUT_DIR),output)/submission.csv

# Round 1 of pseudo-labelling (configs/kaggle.yaml has `pseudo` on): train and tune without
# pseudo-labels, then label train_semi_supervised/; `make submission` is round 2.
NOPSEUDO = $(PY) $(1) --config $(CONFIG) --data-dir $(DATA_DIR) --set pseudo.enabled=false $(ARGS)
pseudo: preprocess
	$(call NOPSEUDO,02_train_yolox.py)
	$(call NOPSEUDO,03_train_maskrcnn.py)
	$(call NOPSEUDO,04_train_upernet.py)
	$(call NOPSEUDO,05_ensemble.py)
	$(call NOPSEUDO,-m neuroseg pseudo-label)

# Kaggle offline bundle of the trained models: make kaggle KAGGLE_USER=<your Kaggle user name>
KAGGLE_USER ?=
kaggle: venv
	@test -n "$(KAGGLE_USER)" || { echo "make kaggle: set KAGGLE_USER=<your Kaggle user name>" >&2; exit 2; }
	$(PY) -m neuroseg kaggle-bundle --user $(KAGGLE_USER) --config $(CONFIG) $(ARGS)

bench: venv
	$(PY) bench/bench_metric.py
