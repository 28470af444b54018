# The front door. Every target that builds first installs missing Debian packages (make deps).
MAKEFLAGS += --no-print-directory
BUILD     ?= build
ASAN_BUILD ?= build-asan
JOBS      ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_FLAGS ?=

.PHONY: all deps build test test-asan demo bench fuzz mutants install wheel clean
# `make install PREFIX=/some/dir` installs under that prefix (default: CMake's, /usr/local);
# DESTDIR=/staging prepends a staging root as usual.
PREFIX ?=

all: build

deps:
	@./scripts/deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# The C tests under AddressSanitizer + UndefinedBehaviorSanitizer (CI runs this too).
test-asan: deps
	cmake -S . -B $(ASAN_BUILD) -DKVF_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug $(CMAKE_FLAGS)
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j $(JOBS) -L c

demo: build
	./scripts/demo.sh $(BUILD)

# kvferry beside its baselines on this machine, all measured in the same run: raw TCP, memcpy,
# process_vm_writev, iperf3 and UCX's ucx_perftest (missing Debian tools are installed). Prints
# the ratio table, writes bench/results/*.json and bench/results/bench.png. A few minutes.
bench: build
	./bench/compare.sh $(BUILD)

# Coverage-guided fuzzing of every parser of untrusted bytes (tests/fuzz) with libFuzzer and
# ASan+UBSan, FUZZ_SECONDS per target, starting from the targets' seeds. A crashing input is
# written to $(FUZZ_BUILD)/corpus/crash-*; replay it with build/tests/<target> FILE.
FUZZ_BUILD   ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := fuzz_tcp fuzz_store fuzz_records fuzz_auth fuzz_p2p
fuzz: build
	@./scripts/deps.sh clang libclang-rt-14-dev
	CC=clang cmake -S . -B $(FUZZ_BUILD) -DKVF_FUZZ=ON -DKVF_BUILD_PYTHON=OFF \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target $(FUZZ_TARGETS)
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t && \
	  $(BUILD)/tests/$$t --write-seeds $(FUZZ_BUILD)/corpus/$$t >/dev/null && \
	  (cd $(FUZZ_BUILD)/corpus && ../tests/$$t -max_total_time=$(FUZZ_SECONDS) -max_len=8192 \
	     -print_final_stats=1 $$t) || exit 1; \
	done

# Break each invariant of tests/mutants/*.patch in a scratch copy of the tree and require the
# tests named for it to fail (CI runs this). A few minutes; MUTANTS_DIR (default build-mutants).
mutants: deps
	./scripts/mutants.sh

install: build
	DESTDIR="$(DESTDIR)" cmake --install $(BUILD) $(if $(PREFIX),--prefix "$(PREFIX)")

# A wheel of the Python package in dist/, for the interpreter the module was built for (CMake's
# Python3_EXECUTABLE, /usr/bin/python3 by default): `pip install dist/kvferry-*.whl`, offline,
# into any CPython of the same version (a venv, pyenv, conda).
wheel: build
	@py=$$(sed -n 's/^Python3_EXECUTABLE:FILEPATH=//p' $(BUILD)/CMakeCache.txt); \
	  "$${py:-/usr/bin/python3}" scripts/wheel.py $(BUILD)/python dist

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD) build-mutants dist
