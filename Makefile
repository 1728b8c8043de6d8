# Every target bootstraps .venv itself, so a fresh clone needs nothing but Python >= 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: venv test unit unit-py313 e2e check demo run bench bench-quick bench-smoke bench-overhead bench-instructions bench-decision bench-real bench-replicas soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	touch $(STAMP)

## every test: unit, integration over real sockets, then the end-to-end suite on real llama-server
## The unit and socket tests run on two workers, a test class to each (its servers are its
## own): most of their time is spent waiting on sockets (290 s -> 154 s here). The end-to-end
## suite runs alone: on two workers it gained 20 s and one of its cache checks failed.
UNIT_PYTEST := -m "not e2e" -n 2 --dist loadscope
test: $(STAMP)
	scripts/install-test-deps.sh
	$(BIN)/python -m pytest -q $(UNIT_PYTEST)
	$(MAKE) e2e
	$(MAKE) bench-smoke

unit: $(STAMP)
	scripts/install-test-deps.sh
	$(BIN)/python -m pytest -q $(UNIT_PYTEST)

e2e: $(STAMP)
	scripts/build-llama-server.sh
	$(BIN)/python -m pytest -q -m e2e tests/e2e

## the unit and socket tests again on Python 3.13, when one is installed (CI does this)
PY313 ?= $(shell PYENV_VERSION=3.13.0 command -v python3.13 >/dev/null 2>&1 && echo "env PYENV_VERSION=3.13.0 python3.13")
unit-py313:
	@if [ -z "$(PY313)" ]; then echo "no Python 3.13 here: skipping the 3.13 run"; exit 0; fi; \
	test -x .venv313/bin/python || $(PY313) -m venv .venv313; \
	test -f .venv313/.installed -a .venv313/.installed -nt pyproject.toml || { \
	  .venv313/bin/python -m pip install --quiet -e ".[test]" && touch .venv313/.installed; }; \
	.venv313/bin/python -m pytest -q $(UNIT_PYTEST) -p no:cacheprovider

check: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/llamacpp-ha demo $(ARGS)

run: $(STAMP)
	$(BIN)/llamacpp-ha $(ARGS)

## benchmarks: llamacpp-ha against direct, nginx, HAProxy, SGLang's router and LiteLLM, in two
## regimes (decode-bound, prefill-bound), 3 repetitions of every routing contender (< 60 min);
## affinity-least-busy (the old default's variant) is left out to stay under the hour:
## `bench/run.py --contenders ha-affinity-least-busy` runs it alone
BENCH_CONTENDERS := direct,ha-cost,ha-affinity,ha-least-busy,ha-round-robin,nginx-rr,nginx-lc,haproxy,sglang-ca,sglang-rr,litellm
bench: $(STAMP)
	bench/setup.sh
	bench/.venv/bin/python bench/run.py --out bench/results --contenders $(BENCH_CONTENDERS)
	bench/.venv/bin/python bench/replicas.py --out bench/results

## one llamacpp-ha against three sharing state through Redis, behind HAProxy (L4): ~8 min
bench-replicas: $(STAMP)
	bench/setup.sh
	bench/.venv/bin/python bench/replicas.py --out bench/results

## the routing contenders only, one repetition, both regimes, no overhead section (~15 min)
bench-quick: $(STAMP)
	bench/setup.sh
	bench/.venv/bin/python bench/run.py --quick --out test-output/bench-quick

## what each balancer costs (CPU per request and chunk, added latency, streams, memory) and
## the routing decision, 3 repetitions, no routing workloads (~6 min): bench/results-overhead
bench-overhead: $(STAMP)
	bench/setup.sh
	bench/.venv/bin/python bench/run.py --workloads none --regimes decode-bound \
	  --contenders direct,ha-default,nginx-lc,haproxy,sglang-ca --out bench/results-overhead

## one routing decision's cost (policy + index lookup) with 100,000 indexed prefixes, in
## process, 3 repetitions (~1 min; also a section of `make bench`): bench/results/DECISION.md
## user-space instructions per request and per chunk under callgrind: the figure that repeats
## (CPU time here swings by a quarter); ARGS="--src /other/tree/src --src src" compares trees
bench-instructions: $(STAMP)
	bench/setup.sh
	bench/.venv/bin/python bench/instructions.py $(ARGS)

bench-decision: $(STAMP)
	bench/setup.sh
	bench/.venv/bin/python bench/decision.py --out bench/results

## a tiny run of the same harness (direct and llamacpp-ha only), part of `make test`
bench-smoke: $(STAMP)
	$(BIN)/python bench/run.py --smoke --out test-output/bench-smoke

## the Mooncake sample on 3 real llama-server processes (the e2e suite's tiny model): hit rates
## and prompt tokens computed from llama-server's own counters, against the simulator's ranking
bench-real: $(STAMP)
	bench/setup.sh
	scripts/build-llama-server.sh
	bench/.venv/bin/python bench/real.py --out bench/results-real

## minutes of rotating backend faults under load; prints what became of every request
soak: $(STAMP)
	$(BIN)/python scripts/soak.py $(ARGS)

clean:
	rm -rf $(VENV) .venv313 build *.egg-info
