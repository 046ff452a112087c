# Two commands do all the set-up on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-heavy bench bench-big bench-llm bench-e2e bench-pareto bench-compare bench-compile bench-gap bench-time bench-dominance bench-plan clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned: these builds install from local disk on our machines.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m remat.tools.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-heavy: $(STAMP)
	$(PY) -m pytest -q -m heavy

bench: $(STAMP)
	$(PY) benchmarks/chain_scaling.py

# The acceptance models at standard sizes, on fake tensors: writes benchmarks/results/e2e_models.md
bench-e2e: $(STAMP)
	$(PY) benchmarks/e2e_models.py

# Pareto fronts (peak against recompute) of resnet50 and gpt2, on fake tensors:
# writes benchmarks/results/pareto.md, pareto_resnet50.png and pareto_gpt2.png
bench-pareto: $(STAMP)
	$(PY) benchmarks/pareto.py

# remat against hand-written checkpointing (HF gradient_checkpointing_enable, per-layer
# torch.utils.checkpoint) on gpt2 and resnet50, fake tensors: writes benchmarks/results/compare.md
bench-compare: $(STAMP)
	$(PY) benchmarks/compare.py

# remat's budget plans against torch.compile's min-cut partitioner under activation_memory_budget
# (resnet50, gpt2, densenet121, vit_b_16; fake tensors; compiles each model 5-20 times, about
# half an hour on 2 cores): writes benchmarks/results/compile_budget.md
bench-compile: $(STAMP)
	$(PY) benchmarks/compile_budget.py

# remat's chain solvers and value-level program against the exact integer program (HiGHS)
# on random op chains and DAGs of at most 40 ops (about an hour on 2 cores): writes
# benchmarks/results/optimality_gap.md
bench-gap: $(STAMP)
	$(PY) benchmarks/optimality_gap.py --jobs 2

# Llama-2-7B- and 70B-shaped models planned without weights (fake tensors; a few minutes):
# writes benchmarks/results/big_models.md
bench-big: $(STAMP)
	$(PY) benchmarks/big_models.py

# Language models (gpt2, llama-, mistral-, qwen2-shaped, t5, bart, bert) against HF per-layer
# checkpointing and torch.compile's min-cut partitioner, fake tensors: writes benchmarks/results/llm.md
bench-llm: $(STAMP)
	$(PY) benchmarks/llm.py

# Step time of remat's plans against per-block checkpointing and torch.compile, real CPU tensors,
# steps interleaved (about half an hour on 2 cores): writes benchmarks/results/step_time.md
bench-time: $(STAMP)
	$(PY) benchmarks/step_time.py

# remat at every peer's point (per-block, selective per-block, sqrt(n) segments, torch.compile's
# min-cut at activation_memory_budget 0.0..1.0), one model per family, fake tensors (hours on
# 2 cores; --all for every torchvision classifier): writes benchmarks/results/dominance.md
bench-dominance: $(STAMP)
	$(PY) benchmarks/dominance.py

# How long plans take to make (least peak and three budgets, capture included; fake tensors,
# a few minutes): writes benchmarks/results/planning_time.md
bench-plan: $(STAMP)
	$(PY) benchmarks/planning_time.py

clean:
	rm -rf $(VENV) build src/*.egg-info
