# lorag: `make serve` runs the daemon, `make test` runs the suite; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUBS := lorag/v1/lorag_pb2.py lorag/v1/lorag_pb2_grpc.py
KERNEL := $(VENV)/.sgmv-built
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# mkdocs-material's notice of its successor would print on every build
export NO_MKDOCS_2_WARNING ?= 1
# empty: Python caches the bytecode of what it imports (a set value turns that off, and
# every process, each test daemon too, would compile its imports again)
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup proto serve test test-fast test-llamacpp lint-imports demo demo-tools screenshots lint clean bench fuzz \
	bench-setup docs docs-serve

setup: $(STAMP) $(STUBS) $(KERNEL)

# torch goes in first and pinned, by pip: it takes the CPU wheel on this machine's disk;
# a loose torch requirement would pull a multi-GB CUDA build. The rest goes in with uv
# (PyPI's `uv`: the same versions pip resolves, in ~25 s where pip took ~4.5 minutes),
# torch pinned again so that nothing can replace the CPU build. The vllm extra is vLLM's
# CPU build (the vLLM backend, `lorag serve --backend vllm`); its pins match this venv's
# torch and transformers, and its torchvision / torchaudio / torchcodec go: they fail to
# import beside the CPU torch (`torchvision::nms`) and text models never use them.
# No bytecode is compiled here: Python writes it for the modules a run imports, the first
# time it imports them (PYTHONDONTWRITEBYTECODE, set on some machines, is cleared below),
# a fraction of compiling the whole venv (~70 s on 2 cores). The stamp makes a re-run a
# no-op.
PIP_FLAGS := --quiet --disable-pip-version-check --no-compile
UV_FLAGS := --quiet --python $(BIN)/python
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) torch==2.13.0 uv
	$(BIN)/uv pip install $(UV_FLAGS) -e '.[dev,vllm]' torch==2.13.0
	$(BIN)/uv pip uninstall $(UV_FLAGS) torchvision torchaudio torchcodec
	touch $(STAMP)

# The engine's CPU kernels (SGMV and w8a8; server/engine/kernels.py), compiled once for
# this CPU (~15 s) so that the first engine start does not pay it; rebuilt when a source
# changes. It needs a C++ compiler: Debian's g++ is installed when missing (as root);
# without one the engine falls back to batched matmuls and bitsandbytes, and the test
# suite fails saying so.
# The compiler keeps one core busy; on another, collecting the tests (output discarded)
# imports what they import, and so writes its bytecode, which a fresh venv's first test
# run would otherwise compile as it goes (~35 s of the fast lane on 2 cores).
$(KERNEL): server/engine/csrc/sgmv.cpp server/engine/csrc/w8a8.cpp $(STAMP) $(STUBS)
	command -v c++ >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends g++)
	$(BIN)/pytest --collect-only -q -p no:cacheprovider >/dev/null 2>&1 & \
	$(BIN)/python -c "from lorag.server.engine.kernels import kernels_available as ok; \
		print('the engine CPU kernels:', 'ready' if ok() else 'unavailable (see the warning)')"; \
	built=$$?; wait; exit $$built
	touch $(KERNEL)

# gRPC stubs from the versioned proto; generated, never committed.
proto: $(STUBS)

$(STUBS): proto/lorag/v1/lorag.proto $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. $<

serve: setup
	$(BIN)/lorag models pull
	$(BIN)/lorag serve

# The layer rules, lint and the docs first (seconds), then the whole suite: both lanes
# (docs/tests.md).
test: setup lint-imports docs
	$(BIN)/ruff check lorag server trainer retrieval benchmarks demo tests
	$(BIN)/pytest -q --durations=20  # the slowest, in every log: the suite has a 25-minute budget

# Schema fuzzing at length: the HTTP API under schemathesis, 1000 cases per operation and
# phase (make test runs 10), with a key and without.
fuzz: setup
	$(BIN)/pytest -q tests/server/test_fuzz_http.py --fuzz-examples 1000

# The fast lane alone: the tiny model; no e2e, fuzzing or slow tests (over a second each).
# Its tests are short and mostly single-threaded Python, so two pytest-xdist workers (each
# module on one of them, its fixtures set up once) share the cores, each with one OpenMP
# thread: with torch's default two each, their spinning threads fought over the two cores
# and the lane got slower (docs/tests.md).
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist loadscope -m "not e2e and not fuzz and not slow"

# The reference site (docs/, mkdocs.yml) into site/; strict: a broken link or a page left
# out of the nav fails it. docs-serve serves it while you edit.
docs: setup
	$(BIN)/mkdocs build

docs-serve: setup
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8001

# import-linter reads the lorag/ folder from disk; the links lorag/server -> ../server
# (and trainer, retrieval, benchmarks) put the parts where their import names say.
lint-imports: setup
	$(BIN)/lint-imports

# llama.cpp as a benchmark peer and as the judge of `lorag export --gguf`: its source
# from the llama-cpp-python sdist on PyPI, llama-server built with cmake, the default base
# converted to GGUF by llama.cpp's own script (a few minutes of compiling, once).
bench-setup: setup
	$(BIN)/lorag models pull
	$(BIN)/python -m lorag.benchmarks.llamacpp

# `lorag export --gguf` checked by llama-server itself (the second CI target).
test-llamacpp: bench-setup
	$(BIN)/pytest -q --llamacpp tests/llamacpp

bench: setup bench-setup
	$(BIN)/lorag models pull
	$(BIN)/lorag bench serving --registered 1024 --json bench-serving.json

# fine-tuning for form, retrieval for facts: train three adapters, ingest, serve, evaluate
# twelve ways (51 minutes on 2 cores with AVX512-BF16); writes demo-results/results.{md,json,png}
demo: setup
	$(BIN)/lorag models pull
	$(BIN)/python -m demo.run

# the tool-use adapter against the base (demo/tools.py): demo-results/tools.{md,json}
demo-tools: setup
	$(BIN)/lorag models pull
	$(BIN)/python -m demo.tools

# the playground's pictures in docs/, with the adapters `make demo` trained
screenshots: setup
	$(BIN)/python -m demo.screenshots

# buf (npm @bufbuild/buf) with the STANDARD rules, configured in proto/buf.yaml; and the
# proto must not break clients of the last released contract (PROTO_BASE, a commit).
PROTO_BASE ?= dd31d58
lint: setup lint-imports
	$(BIN)/ruff check lorag server trainer retrieval benchmarks demo tests
	cd proto && npx --yes @bufbuild/buf lint
	npx --yes @bufbuild/buf breaking proto --against ".git#ref=$$(git rev-parse $(PROTO_BASE)),subdir=proto"

clean:
	rm -rf $(VENV) .pytest_cache $(STUBS) build site
