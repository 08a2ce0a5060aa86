# Two commands do all the setup (see README.md):
#   make demo   creates .venv, installs character-runner, runs the built-in demo (offline, CPU)
#   make test   creates .venv, installs character-runner with test extras, runs `make lint`, then
#               the whole test suite (CI runs exactly this: .ci/run)
#   make lint   ruff, and the architecture guards (import layers, function lengths)
#   make test-fast  lint, then the suite without the tests marked slow (a few minutes on 2 cores)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo lint test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: a plain "torch" requirement would pull several GB of CUDA packages.
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0"
	$(BIN)/pip install --disable-pip-version-check -q -c constraints.txt -e ".[all,test]"
	# insightface without its deps: its wheel requires the GUI opencv-python, which would
	# replace opencv-python-headless; everything it needs is in the [faces] extra.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps "insightface==2.1"
	# rtmlib (body pose for ControlNet-OpenPose) the same way: it requires the GUI opencv builds too.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps "rtmlib==0.0.16"
	touch $(STAMP)

# The review pages' browser tests drive Debian's chromium (Playwright never downloads a browser).
# CI runs as root on Debian: install it when it is missing; elsewhere say how.
browser:
	@test -x /usr/bin/chromium || { apt-get update -q && apt-get install -y -q chromium; } \
	  || echo "note: no /usr/bin/chromium; the browser tests skip (run: sudo apt-get install chromium)"

setup: $(STAMP) browser

demo: $(STAMP)
	$(BIN)/runner apply specs/demo.yaml

# ruff with pyproject.toml's [tool.ruff] settings, and tests/test_layers.py (no import goes up a layer
# of docs/architecture.md; no function in runner/engine over 60 lines, none in runner/ over 100).
# Both run even when the first fails, so one call lists every problem.
lint: $(STAMP)
	@status=0; \
	echo "$(BIN)/ruff check ."; $(BIN)/ruff check . || status=1; \
	echo "$(BIN)/python -m pytest -q tests/test_layers.py"; \
	$(BIN)/python -m pytest -q tests/test_layers.py || status=1; \
	exit $$status

# The suite runs in $(TEST_WORKERS) processes (pytest-xdist), whole test files per process
# (--dist loadfile: a module's fixtures, servers and caches stay in one process). CI has 2 cores.
# TEST_WORKERS=0 runs it in this process (for pdb, or a single test file).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: lint browser
	$(PYTEST)

# The fast lane: what `make test` runs but the tests marked @pytest.mark.slow (more than a few
# seconds each: whole applies, real-photo and real-clip sweeps, the demo); `make test` runs them all.
test-fast: lint
	$(PYTEST) -m "not slow"

clean:
	rm -rf .runner reports/demo
