# tokenrig — the commands of the README: `make loadtest`, `make train`, `make test`, `make test-fast`.
# Every target sets itself up on first use (a local .venv with the CPU build of torch).

PYTHON   ?= python3
BACKEND  ?= hf
# vLLM 0.26 and SGLang 0.5.17 pin torch 2.11 (CUDA), the default venv has torch 2.13: BACKEND=vllm or sglang
# gets a venv of its own
ENGINES  := vllm sglang
VENV     := $(if $(filter $(ENGINES),$(BACKEND)),.venv-$(BACKEND),.venv)
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed-stamp

GPU      ?= cpu
MODEL    ?= tiny
SCENARIO ?= chat
USERS    ?=
RATE     ?=
DURATION ?=
ARGS     ?=
MODE     ?= pretrain
ZERO     ?= 2
MATRIX   ?= study-7b
DECODE_CONFIGS ?= eager sdpa sdpa+graphs+kvpad=1024

LOAD_ARGS = --gpu $(GPU) --model $(MODEL) --backend $(BACKEND) \
	$(if $(USERS),--users $(USERS)) $(if $(RATE),--rate $(RATE)) $(if $(DURATION),--duration $(DURATION)) $(ARGS)

.PHONY: setup setup-vllm setup-sglang loadtest serve train finetune train-matrix train-gpu-run train-mfu-campaign lint test test-fast monitor dashboards bench-loadgen bench-capacity bench-hf-decode bench-search report capacity clean

$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
ifneq ($(filter $(ENGINES),$(BACKEND)),)
	# a CUDA machine with internet access: vLLM 0.26.0 or SGLang 0.5.17 brings its torch 2.11 (CUDA builds)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[$(BACKEND),test]'
else
	# torch through pip, which reads the machine's pip configuration (a local CPU wheel, constraints); the rest
	# through uv, which resolves and downloads in parallel: the whole set-up took 47 s against pip's 110 s on a
	# 2-core CI VM (cold caches both), the same 125 packages. uv keeps the torch installed here (it only replaces
	# what no longer satisfies a requirement). --compile-bytecode as pip does: uv writes no .pyc by default, and where
	# PYTHONDONTWRITEBYTECODE is set (this CI's machines) every process then compiled torch, transformers and DeepSpeed
	# from source at import: the tests' parallel part took 741 s against pip's 528 s
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0 uv==0.13.8
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[test,fast,train]'
	# GPTQ/AWQ loading (transformers -> optimum -> gptqmodel). --no-deps: gptqmodel 7.7 declares torch>=2.14.1
	# but its CPU torch kernels run on the torch installed above; these are the imports it needs.
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --no-deps --no-build-isolation \
		optimum==2.3.0 gptqmodel==7.7.0 device-smi==0.5.7 logbar==0.4.15 tokenicer==0.0.14 pypcre==0.6.4 \
		defuser==0.0.28 threadpoolctl==3.8.0
endif
	@touch $(STAMP)

setup: $(STAMP)

setup-vllm:  # tokenrig + vLLM 0.26.0 in .venv-vllm; then make loadtest BACKEND=vllm GPU=h200 MODEL=7b
	$(MAKE) setup BACKEND=vllm

setup-sglang:  # tokenrig + SGLang 0.5.17 in .venv-sglang (offline hosts: scripts/stage_sglang.sh)
	$(MAKE) setup BACKEND=sglang

loadtest: setup
	$(BIN)/tokenrig loadtest --scenario $(SCENARIO) $(LOAD_ARGS)

serve: setup
	$(BIN)/tokenrig serve --gpu $(GPU) --model $(MODEL) --backend $(BACKEND) $(ARGS)

# training throughput with DeepSpeed (GPU=cpu: one CPU process): tokens/s, MFU, memory, breakdown
train: setup
	$(BIN)/tokenrig train --gpu $(GPU) --model $(MODEL) --mode $(MODE) --zero $(ZERO) $(ARGS)

# fine-tuning: LoRA unless MODE=qlora (a GPU with bitsandbytes: pip install '.[qlora]')
finetune: setup
	$(BIN)/tokenrig train --gpu $(GPU) --model $(MODEL) --mode $(if $(filter qlora,$(MODE)),qlora,lora) --zero $(ZERO) $(ARGS)

# a grid of training runs into one comparison table (tokenrig/scenarios/train/, tokenrig/scenarios/matrix/)
train-matrix: setup
	$(BIN)/tokenrig train --matrix $(MATRIX) $(ARGS)

# issue 6 on a host of 4 or 8 GPUs (.venv with a CUDA torch): the eight-gpu matrix, most important first, under
# BUDGET_S seconds; results.tgz, comparison.md, card.txt, gpu.csv in results/gpu-run (docs/results/train_gpu_run.sh)
train-gpu-run: setup
	PY=$(BIN)/python OUT=results/gpu-run RES=results/gpu-run/runs bash docs/results/train_gpu_run.sh

# ruff (style, pyflakes, import order, 120 columns) over the repository and mypy over tokenrig/ (pyproject.toml)
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

# on one GPU: the MFU ladder of 7B pre-training (SDPA backend, compile, Liger, optimizer, host syncs, batch), then
# the study-7b points the memory planner says fit the card (docs/results/train_mfu_campaign.sh)
train-mfu-campaign: setup
	PY=$(BIN)/python OUT=results/mfu-campaign RES=results/mfu-campaign/runs bash docs/results/train_mfu_campaign.sh

# two at a time on the machine's cores, each file on one worker (its servers start once); then the tests marked
# `timing` alone, since they judge latencies against a schedule that a neighbouring test's load would move.
# mypy (45 s of one core on a fresh clone) checks beside the first part, not before it with the other core idle;
# its verdict is printed after that part and fails the target as before
test: setup
	$(BIN)/ruff check .
	@status=0; \
	$(BIN)/mypy > $(VENV)/mypy.out 2>&1 & mypy=$$!; \
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not timing" --durations=15 || status=$$?; \
	wait $$mypy || status=$$?; echo "$(BIN)/mypy"; cat $(VENV)/mypy.out; \
	$(BIN)/python -m pytest -q -m timing --durations=10 || status=$$?; \
	exit $$status

# the inner loop, < 60 s: every test that starts no server or CLI process (tests/conftest.py marks those e2e)
# and is not marked slow
test-fast: setup lint
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

# one offline HTML report (and CSV exports) of run directories: make report RUNS="results/RUN_A results/RUN_B"
RUNS ?= results
report: setup
	$(BIN)/tokenrig report $(RUNS) -o results/report.html --csv results/csv $(ARGS)

# GPUs and cost for a target load, from the measured runs in docs/results (and results/): e.g.
# make capacity GPU=h100-sxm,a800,rtx4090 MODEL=13b ARGS="--quant bf16,awq --slo ttft_p99=500ms,tpot_p99=50ms --target-rps 50"
capacity: setup
	$(BIN)/tokenrig capacity --from docs/results $(wildcard results) --gpu $(GPU) --model $(MODEL) --scenario $(SCENARIO) $(ARGS)

monitor: setup
	$(BIN)/python -m tokenrig.monitor.local

# the ceiling measured here is kept for this machine's load tests (tokenrig/loadgen/ceiling.py)
bench-loadgen: setup  # the load generator's own ceiling per core; table -> docs/results/loadgen-capacity.md
	$(BIN)/python benchmarks/loadgen.py --out docs/results/loadgen-capacity.md --save-ceiling

# capacity projections against measured SLO searches, one configuration left out at a time (docs/capacity.md)
bench-capacity: setup
	$(BIN)/python benchmarks/capacity_holdout.py --from docs/results --json docs/results/capacity-holdout.json $(ARGS)

# --find-max against a sim queue whose knee is computed, beside a 10-rate sweep: table -> docs/results/slo-search.md
bench-search: setup
	$(BIN)/python benchmarks/search.py --out docs/results/slo-search.md $(ARGS)

bench-hf-decode: setup  # batch-1 decode of the hf engine vs the bandwidth roofline, e.g. GPU=h200 MODEL=7b
	$(BIN)/python benchmarks/hf_decode.py --gpu $(GPU) --model $(MODEL) --configs $(DECODE_CONFIGS) $(ARGS)

dashboards: setup
	$(BIN)/python -m tokenrig.monitor.dashboards

clean:
	rm -rf $(VENV) results *.egg-info
