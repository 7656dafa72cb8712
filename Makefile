# tcskd: cache -> basis -> train on the built-in default (MNIST-5k digits and an
# ImageNet-pretrained EfficientNet-Lite0 teacher, both shipped in pip packages).
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
TCSKD := $(BIN)/tcskd
export TCSKD_CACHE ?= caches
RUNS  ?= runs

DATA        ?= builtin:mnist5k
TEACHER     ?= builtin:efficientnet-lite0
IMAGE_SIZE  ?= 112
DEVICE      ?= auto
STUDENT     ?= cnn
DIM         ?=
LAMBDA      ?=
JOBS        ?= 2
GRID_SEEDS  ?= 0 1 2
EPOCHS      ?= 15
SEEDS       ?= 0
METHODS     ?= ce fitnet tcs
CACHE_OPTS  := --data $(DATA) --teacher $(TEACHER) --image-size $(IMAGE_SIZE) --device $(DEVICE)

RECIPE      ?= recipes/default.yaml
SET         ?=

.PHONY: install demo dense dense-ksweep peers recipe grid cache basis train eval report test test-fast test-heavy bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev,hf]"
	touch $@

install: $(BIN)/.installed

# Stage 1: the train and test caches of the default (prints their paths).
cache: install
	$(TCSKD) cache $(CACHE_OPTS) --split train
	$(TCSKD) cache $(CACHE_OPTS) --split test

TRAIN_CACHE = $$($(TCSKD) -q cache $(CACHE_OPTS) --split train | tail -n1)
TEST_CACHE  = $$($(TCSKD) -q cache $(CACHE_OPTS) --split test | tail -n1)

# Stage 2: the default PCA basis (256 coordinates stored, the validation rows left out) of the train cache.
basis: cache
	$(TCSKD) basis --cache $(TRAIN_CACHE) --name pca --kind pca --dim 256 --coords --exclude-val --device $(DEVICE)

# Stage 3: the default student with TCS (its defaults unless DIM / LAMBDA are given) on the default caches.
train: basis
	$(TCSKD) train --cache $(TRAIN_CACHE) --basis pca --student $(STUDENT) --method tcs \
	  $(if $(DIM),--dim $(DIM)) $(if $(LAMBDA),--lambda $(LAMBDA)) --epochs $(EPOCHS) --device $(DEVICE) \
	  --out $(RUNS)/train-tcs --resume

# The teacher's reference accuracy from cached features alone (validation rows held out as in training).
eval: cache
	$(TCSKD) eval --cache $(TRAIN_CACHE) --test-cache $(TEST_CACHE) --device $(DEVICE) --out $(RUNS)/teacher-eval.json

# The validation grid behind the defaults and the README's method table (3 seeds; long on a CPU).
grid: install
	SEEDS="$(GRID_SEEDS)" EPOCHS=$(EPOCHS) IMAGE_SIZE=$(IMAGE_SIZE) DEVICE=$(DEVICE) \
	  JOBS=$(JOBS) RUNS=$(RUNS)/grid STUDENT=$(STUDENT) TCSKD=$(TCSKD) bash scripts/grid.sh

# The main job, the recipe recipes/default.yaml: cache -> basis -> train ce, fitnet and tcs at all labels
# and at 10 labels per class, the teacher's eval, and the comparison report (resumable).
demo: install
	SEEDS="$(SEEDS)" METHODS="$(METHODS)" EPOCHS=$(EPOCHS) DIM=$(DIM) LAMBDA=$(LAMBDA) IMAGE_SIZE=$(IMAGE_SIZE) \
	  DEVICE=$(DEVICE) RUNS=$(RUNS)/demo STUDENT=$(STUDENT) TCSKD=$(TCSKD) bash scripts/demo.sh

# Dense TCS on the built-in segmentation set (recipes/mnist-seg.yaml): a patch-token cache, PCA and random
# token bases, segnet students (ce, raw-token fitnet, tcs-pca, tcs-random) at 10 / 50 / all labelled masks,
# 3 seeds, and the mIoU report in runs/mnist-seg (about an hour on 2 CPU cores; resumable).
dense: install
	$(TCSKD) run recipes/mnist-seg.yaml $(foreach s,$(SET),--set '$(s)')

# Dense PCA against random at K = 4, 16, 64 with 50 labelled masks (recipes/mnist-seg-ksweep.yaml, 18 runs).
dense-ksweep: install
	$(TCSKD) run recipes/mnist-seg-ksweep.yaml $(foreach s,$(SET),--set '$(s)')

# The built-in job side by side with torchdistill and timm (scripts/peers.sh): tcskd's ce / fitnet / tcs, the
# peers' online FitNet and CE-only, the traditional pipeline (fine-tuned teacher, then KD / CRD / RKD), the
# no-augmentation control, 3 seeds; the report with cost columns and
# the claims table in runs/peers (resumable; many hours on 2 CPU cores: the peers run the teacher every step).
peers: install
	SEEDS="$(GRID_SEEDS)" EPOCHS=$(EPOCHS) IMAGE_SIZE=$(IMAGE_SIZE) DEVICE=$(DEVICE) RUNS=$(RUNS)/peers \
	  STUDENT=$(STUDENT) TCSKD=$(TCSKD) bash scripts/peers.sh

# Any recipe, e.g. make recipe RECIPE=recipes/fewshot.yaml SET="cache.data=cifar100:/data train.epochs=1"
# (SET: space-separated KEY=VALUE overrides; write YAML lists without spaces: grid.seed=[0,1,2]).
recipe: install
	$(TCSKD) run $(RECIPE) $(foreach s,$(SET),--set '$(s)')

report:
	$(TCSKD) report $(RUNS)/demo/*-lpc*/ $(foreach f,$(wildcard $(RUNS)/demo/teacher-lpc*.json),--teacher-eval $(f)) \
	  --png $(RUNS)/demo/report.png

# Two pytest workers (pytest-xdist), each test file on one of them: the suite waits on subprocesses and
# sleeps as much as it computes.
test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

# Evidence at scale kept out of make test for its time: peak memory of --targets store/ram/ce on a 655 MB cache.
test-heavy: install
	$(BIN)/python -m pytest -q -m heavy

bench: install
	$(TCSKD) bench --device $(DEVICE) --out bench/out/bench.json

clean:
	rm -rf $(RUNS) caches .pytest_cache
