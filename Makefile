# enclaveml: `make demo` and `make test` work on a fresh clone; each creates .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
SHARED ?= ../shared

.PHONY: venv test test-all demo zoo bench-assess bench-serve bench-replicas load-serve bench-caltrain bench-caltrain-distributed bench-label-leakage bench-crypto bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch (its wheel lies on disk here; a plain `torch` pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -c constraints.txt -e '.[samples,test]'
	# onnx2torch without its torchvision dependency: that would replace the CPU torch with a CUDA build
	$(PY) -m pip install -q --no-deps onnx2torch==1.5.15
	touch $(STAMP)

venv: $(STAMP)

# `make test` stays under 10 minutes on 2 cores; `make test-all` adds the `extended` end-to-end runs
# (the digits demo, the zoo release, the docs' CalTrain example, ImageNet all the way: about 2 minutes more).
# Two pytest-xdist workers, a test file each at a time (module fixtures such as a started server
# stay in one worker): most end-to-end tests wait on process start-up, so two keep 2 cores busy.
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
TEST_ARGS := -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: $(STAMP)
	$(PY) -m pytest $(TEST_ARGS) -m "not extended"

test-all: $(STAMP)
	$(PY) -m pytest $(TEST_ARGS)

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

zoo: $(STAMP)
	$(PY) benchmarks/train_zoo.py

bench-assess: $(STAMP)
	$(PY) benchmarks/bench_assess.py

bench-serve: $(STAMP)
	$(PY) benchmarks/bench_serve.py

bench-replicas: $(STAMP)
	$(PY) benchmarks/bench_replicas.py

load-serve: $(STAMP)
	$(PY) benchmarks/load_serve.py

bench-caltrain: $(STAMP)
	$(PY) benchmarks/bench_caltrain.py

bench-caltrain-distributed: $(STAMP)
	$(PY) benchmarks/bench_caltrain_distributed.py

bench-label-leakage: $(STAMP)
	$(PY) benchmarks/bench_label_leakage.py

bench-crypto: $(STAMP)
	$(PY) benchmarks/bench_crypto.py

bench: bench-assess bench-serve bench-caltrain

clean:
	rm -rf $(VENV) out .pytest_cache
