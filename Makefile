# Two commands on a machine with only python3: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dualenc-installed
DEMO   ?= data/demo

.PHONY: install demo test bench clean

# torch/torchvision first, pinned: pip takes these from local disk; everything else from the index.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Build the embedded synthetic dataset and its WordPiece vocab, train the tiny model on CPU, then
# zero-shot classify colour-shape combinations never seen in training.
demo: install
	$(BIN)/dualenc-data demo --out $(DEMO) --overwrite
	$(BIN)/dualenc-data tokenizer --shards $(DEMO)/train --out $(DEMO)/tokenizer --overwrite
	$(BIN)/dualenc fit --config configs/demo.yaml --data.train $(DEMO)/train --data.val $(DEMO)/val \
	    --data.eval_sets.zeroshot '[{name: heldout, data: $(DEMO)/heldout}]'
	$(BIN)/dualenc zeroshot --model runs/demo/export --data $(DEMO)/heldout --name "held-out combinations"

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench_train_step.py --device cpu

clean:
	rm -rf runs data/demo .pytest_cache
