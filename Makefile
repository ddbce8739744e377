# Two commands on a fresh machine: `make demo` (set-up + the main job end to end) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= demo-output
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test test-slow bench clean

$(BIN)/diffseg: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/diffseg

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (offline, installed when we are root)
data:
	@test -f $(FASHION_MNIST) || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null); } \
	  || { echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (or set data.path to a folder of its IDX files)"; exit 1; }

# the main job: a diffusion feature backbone on unlabelled fashion-seg canvases (trained on t < 300 only, the
# noise levels the readout reads) -> the tuned readout on 20 labelled canvases -> mIoU on held-out test canvases
# next to a supervised baseline trained on the same 20
demo: setup data
	$(BIN)/diffseg train --recipe fashion-seg-demo --output-dir $(OUT)/ddpm
	$(BIN)/diffseg segment fit --model $(OUT)/ddpm --recipe fashion-seg-demo --num-labeled 20 --output-dir $(OUT)/segmenter
	$(BIN)/diffseg segment eval --classifier $(OUT)/segmenter --json $(OUT)/metrics.json
	@echo "picture: $(OUT)/segmenter/eval_panel.png" \
	  "(image | truth | diffusion readout | uncertainty | baseline, class legend below)"

test: setup data
	$(BIN)/python -m pytest -q -n 2

test-slow: setup data
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) $(OUT)
