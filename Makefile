PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NATIVE := smoe/csrc/.built

.PHONY: install run test bench lint clean demo browser cross selftest neon-selftest

install: $(STAMP) $(NATIVE)

$(STAMP): pyproject.toml setup.py
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so pip takes the CPU build from this machine's disk
	$(BIN)/pip install --quiet torch==2.13.0
	# no build isolation: the native kernels (smoe/csrc) compile against the torch just installed
	$(BIN)/pip install --quiet "setuptools>=68" wheel ninja
	$(BIN)/pip install --quiet --no-build-isolation -e '.[test]'
	touch $(STAMP) $(NATIVE)

# the native kernels again when their source changes (a failed build leaves PyTorch's kernels in use)
$(NATIVE): $(wildcard smoe/csrc/*.cpp smoe/csrc/*.h)
	$(BIN)/python setup.py --quiet build_ext --inplace
	touch $(NATIVE)

DEMO := smoe/assets/demo/config.json
PROMPT := The meaning of life is

run: install
	@if [ -f $(DEMO) ]; then \
		$(BIN)/smoe generate --prompt "$(PROMPT)" --max-tokens 80 --temperature 0.7 --top-p 0.9 --seed 0; \
	else \
		echo "(the demo model is not bundled yet: generating from a tiny random-weight Mixtral with Mixtral-8x7B's tokenizer)"; \
		$(BIN)/python benchmarks/random_checkpoint.py --preset tiny --out .cache/random-tiny >/dev/null 2>&1 && \
		$(BIN)/smoe generate --model .cache/random-tiny --prompt "$(PROMPT)" --max-tokens 64 --ignore-eos; \
	fi

# the routing page is checked in headless Chromium (Debian's package); best effort, the test skips without it
browser:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: could not install chromium; the browser test will be skipped"; }

# the kernels' self-test builds for aarch64 and runs under qemu (Debian's packages); best effort,
# tests/test_native.py skips it without them
cross:
	@command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1 || \
		{ (apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user) >/dev/null 2>&1 \
		|| echo "note: could not install the aarch64 cross compiler and qemu; the NEON self-test will be skipped"; }

# every kernel variant this CPU runs against the portable one, without torch (smoe/csrc/selftest.cpp)
SELFTEST_FLAGS := -O2 -std=c++17 -ffp-contract=off -static -w
selftest:
	@mkdir -p build && g++ $(SELFTEST_FLAGS) smoe/csrc/selftest.cpp -o build/selftest && ./build/selftest

# the same for aarch64 (the NEON variant), cross-compiled and run under qemu
neon-selftest: cross
	@mkdir -p build && aarch64-linux-gnu-g++ $(SELFTEST_FLAGS) smoe/csrc/selftest.cpp -o build/selftest-aarch64 && \
		qemu-aarch64 -cpu max build/selftest-aarch64

test: install browser cross
	$(BIN)/python -m pytest

# rebuild the bundled demo model from scratch (~70 min on 2 cores)
demo: install
	$(BIN)/python scripts/build_corpus.py --out data/corpus
	$(BIN)/python scripts/aux_experiment.py --out runs/aux-experiment
	$(BIN)/smoe train --config configs/demo.json
	$(BIN)/python scripts/export_demo.py --run runs/demo --corpus data/corpus

# llama-cpp-python builds llama.cpp from source (~6 min, once)
bench: install
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_engines.py

lint: install
	$(BIN)/ruff check smoe tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .cache smoe/_native*.so $(NATIVE)
