# mtlcore: every target sets itself up from nothing (a Python 3.11 and a C++ compiler).
#   make test    venv + pinned deps + build the wheel + install it + run the tests
#   make run     same set-up, then the main job
#   make wheel   a compiled wheel in dist/
#   make bench   the benchmarks (results in bench/results/)
#   make lint    ruff and clang-format checks (make format applies them)
#   make test-asan  the kernel tests against a build with AddressSanitizer + UBSan (CI runs it)
#   make fuzz    the property-based fuzz tests with many more random cases (by hand)
#   make soak    train for up to 30 minutes and check that memory stays flat (by hand)
# MTLCORE_CUDA=AUTO|1|0 chooses whether the CUDA kernels are built (default: when possible).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
MTLCORE_CUDA ?= AUTO
export MTLCORE_CUDA

SOURCES := $(shell find csrc python -type f -not -name '*.pyc' -not -path '*/__pycache__/*') \
           CMakeLists.txt pyproject.toml README.md LICENSE
DEPS_STAMP    := $(VENV)/.deps-installed
INSTALL_STAMP := $(VENV)/.mtlcore-installed-cuda-$(MTLCORE_CUDA)

.PHONY: all test run wheel bench lint format clean gpu-check test-asan fuzz soak

all: test

$(DEPS_STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The wheel is built in a persistent folder (build/<wheel tag>), so an unchanged tree rebuilds
# nothing; the tests then run against the installed wheel, as a user receives it.
$(INSTALL_STAMP): $(DEPS_STAMP) $(SOURCES)
	rm -f dist/mtlcore-*.whl $(VENV)/.mtlcore-installed-*
	$(PY) -m pip wheel --quiet --no-build-isolation --no-deps -w dist .
	$(PY) -m pip install --quiet --no-deps --force-reinstall dist/mtlcore-*.whl
	touch $@

wheel: $(INSTALL_STAMP)
	@ls dist/mtlcore-*.whl

# pytest's exit code 5 (no test collected) is a failure here: it fails the target, with a note.
test: $(INSTALL_STAMP)
	$(PY) -m pytest tests -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

run: $(INSTALL_STAMP)
	$(PY) -m mtlcore info
	$(PY) -m mtlcore train --data auto --samples 10000 --epochs 3 --baselines --compare-plain --no-progress

bench: $(INSTALL_STAMP)
	$(PY) bench/bench_optim.py
	$(PY) bench/bench_conv.py
	$(PY) bench/bench_loss.py
	$(PY) bench/bench_pool.py
	$(PY) bench/bench_train.py

# The CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer (every report is
# fatal), installed apart in build/asan/site, and the kernel, fuzz, bad-input and thread tests
# run against that build with the sanitizer runtimes preloaded into the interpreter (leak
# checking off: the interpreter itself never frees everything).
SAN_TESTS := tests/test_conv2d_act.py tests/test_max_pool2d.py tests/test_multitask_loss.py \
             tests/test_optim.py tests/test_fuzz.py tests/test_bad_input.py tests/test_threads.py
SAN_ENV = PYTHONPATH=$(CURDIR)/build/asan/site \
  LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1

test-asan: $(DEPS_STAMP)
	MTLCORE_CUDA=0 MTLCORE_SANITIZE=address,undefined $(PY) -m pip install --quiet \
	  --no-build-isolation --no-deps --no-index --upgrade --target build/asan/site \
	  -C build-dir=build/asan/build .
	$(SAN_ENV) $(PY) -c "import mtlcore; i = mtlcore.build_info(); \
	  assert i['sanitize'] == 'address,undefined', i; print('sanitized build:', i)"
	$(SAN_ENV) $(PY) -m pytest $(SAN_TESTS) -q -p no:cacheprovider

fuzz: $(INSTALL_STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/test_fuzz.py -q -p no:cacheprovider \
	  --hypothesis-show-statistics

soak: $(INSTALL_STAMP)
	$(PY) bench/soak.py --minutes 30

CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

lint: $(DEPS_STAMP)
	$(PY) -m ruff check python tests bench
	$(PY) -m ruff format --check python tests bench
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: $(DEPS_STAMP)
	$(PY) -m ruff format python tests bench
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# On a CUDA machine with torch already installed (no downloads): build in place, run the CUDA
# tests and benchmarks, write results under $$OUT (default bench/results).
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build dist $(VENV)/.mtlcore-installed-*
