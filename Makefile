# The test command (README, .ci/run): installs the package with its test extras and what the
# browser tests need, then runs pytest.
PIP_INSTALL = python3 -m pip install -q --disable-pip-version-check -c constraints-cpu.txt
AXE_CORE = axe-core@4.14.1

.PHONY: test install browser
install:
	$(PIP_INSTALL) -e '.[test]'

# tests/test_playground.py: Debian's headless chromium and its driver (apt-get, as root only),
# and axe-core for the accessibility lint (npm). Tolerant: without a browser those tests skip.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver (apt-get)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver; } >/dev/null 2>&1 \
	      || echo "apt-get could not install chromium: the browser tests will skip"; \
	  else echo "no chromium and not root: the browser tests will skip"; fi; fi
	@test -f build/npm/node_modules/axe-core/axe.min.js || ! command -v npm >/dev/null \
	  || npm install --prefix build/npm --no-save --no-audit --no-fund --silent $(AXE_CORE) \
	  || echo "npm could not install $(AXE_CORE)"

test: install browser
	python3 -m pytest -q

# The benchmarks (bench/run.py): set up the peers that install here under bench/results/peers,
# run the standard set into bench/results/*.json, rewrite docs/benchmarks.md's tables and the
# plots. BENCH_MODE=short (a few minutes once the peers are set up) or full.
BENCH_MODE ?= short
.PHONY: bench bench-full
bench:
	python3 bench/run.py --mode $(BENCH_MODE)

bench-full:
	python3 bench/run.py --mode full
