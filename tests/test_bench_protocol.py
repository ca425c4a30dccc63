"""The perf bench's TopK protocol without the peers' venvs: which steps count as quiet, which
variants run in which round, what a variant's summary says, the report, and what a missing peer
venv gives (a message naming `make bench-peers`, not a crash). Nothing here asserts a timing:
the step times that the workers measure are only checked for consistency with the protocol."""

import json
import sys

import pytest

from sae_sweep.bench import perf

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = (16, 64, 4, 32)  # d_in, d_sae, k, batch


def step(wall, waiting_share, in_block=0, cpu=None):
    """A timed step: `waiting_share` of its wall time its threads waited for a core."""
    return {
        "wall": wall,
        "cpu": wall if cpu is None else cpu,
        "runq_wait": waiting_share * wall,
        "minflt": 7,
        "in_block": in_block,
    }


@pytest.mark.unit
def test_a_step_is_quiet_when_its_threads_waited_for_a_core_less_than_the_threshold():
    assert perf.QUIET == 0.05
    times = [step(2.0, 0.0), step(1.0, 0.04), step(1.0, 0.06), step(0.5, 1.5)]
    assert perf.quiet_steps(times) == times[:2]
    assert perf.quiet_steps([]) == []


@pytest.mark.unit
def test_rounds_run_every_variant_then_only_those_without_a_quiet_step_in_a_rotating_order():
    keys = ["a", "b", "c"]
    quiet: set[str] = set()
    has_quiet = quiet.__contains__
    # the first `rounds` rounds: every variant, rotated by one each round
    assert perf.round_order(keys, 0, 2, has_quiet) == ["a", "b", "c"]
    assert perf.round_order(keys, 1, 2, has_quiet) == ["b", "c", "a"]
    quiet.add("a")  # a quiet step does not take a variant out of the first rounds
    assert perf.round_order(keys, 1, 2, has_quiet) == ["b", "c", "a"]
    # then only the variants without a quiet step, still rotating
    assert perf.round_order(keys, 2, 2, has_quiet) == ["b", "c"]
    assert perf.round_order(keys, 3, 2, has_quiet) == ["c", "b"]
    quiet.add("c")
    assert perf.round_order(keys, 3, 2, has_quiet) == ["b"]
    quiet.add("b")
    assert perf.round_order(keys, 4, 2, has_quiet) == []  # nothing left: the rounds end
    assert perf.round_order([], 0, 2, has_quiet) == []


@pytest.mark.unit
def test_summary_reports_the_best_step_and_the_median_of_the_quiet_ones():
    ready = {"version": "9.9", "torch": "2.x", "warmup": [{"wall": 5.0}, {"wall": 3.0}], "rss_before_setup_mib": 100.0}
    times = [
        step(1.0, 0.0, 0),
        step(0.8, 0.5, 1),
        step(1.2, 0.01, 2),  # block 1: the best step is a loaded one
        step(1.6, 0.0, 0),
        step(1.4, 0.0, 1),
    ]
    s = perf.summarize(ready, times, peak_rss_mib=160.0, tokens=4)
    assert s["steps_timed"] == 5 and s["quiet_steps"] == 4
    assert s["best_seconds"] == 0.8 and s["tokens_per_s"] == 4 / 0.8
    assert s["best_step_waiting_threads"] == pytest.approx(0.5)
    assert s["median_seconds"] == 1.4  # quiet walls 1.0, 1.2, 1.4, 1.6: the upper middle
    assert s["median_tokens_per_s"] == 4 / 1.4
    assert s["median_seconds_first_in_block"] == 1.6 and s["median_seconds_later_in_block"] == 1.2
    assert s["warmup_seconds"] == [5.0, 3.0] and s["version"] == "9.9" and s["steps"] is times
    assert s["peak_rss_above_imports_mib"] == 60.0
    # no quiet step: the median is over all steps; no memory figure where the worker gave none
    loaded = perf.summarize({**ready, "rss_before_setup_mib": None}, [step(2.0, 1.0), step(3.0, 1.0, 1)], 50.0, 4)
    assert loaded["quiet_steps"] == 0 and loaded["median_seconds"] == 3.0
    assert loaded["peak_rss_above_imports_mib"] is None


@pytest.mark.integration
def test_a_worker_that_cannot_start_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="exited"):
        perf.StepWorker(perf.ours_python()[0], "no_such_impl", "fp32", threads=1, warmup=0)


@pytest.mark.unit
def test_peer_python_is_the_venv_that_make_bench_peers_creates(tmp_path):
    assert perf.peer_python("sparsify", tmp_path) is None
    (tmp_path / "sparsify" / "bin").mkdir(parents=True)
    (tmp_path / "sparsify" / "bin" / "python").symlink_to(sys.executable)
    assert perf.peer_python("sparsify", tmp_path) == tmp_path / "sparsify" / "bin" / "python"


@pytest.mark.integration
def test_topk_figure_without_peer_venvs_times_ours_and_says_how_to_get_the_peers(tmp_path):
    """fig_topk at tiny dims with an empty venv dir: ours and the roofline are timed in rounds of
    `block` steps (more rounds only for a variant without a quiet step), each missing peer is named
    with `make bench-peers`, and the report renders both."""
    block, rounds, max_rounds = 2, 1, 3
    t = perf.fig_topk(
        perf.torch.device("cpu"),
        {"run_bf16": False},
        tmp_path,
        ["dictionary_learning", "sparsify"],
        rounds=rounds,
        block=block,
        warmup=1,
        threads=1,
        max_rounds=max_rounds,
        dims=TINY,
    )
    assert set(t["variants"]) == {"matmul/fp32", "sae_sweep/fp32"} and t["precisions"] == ["fp32"]
    for name in ("dictionary_learning", "sparsify"):
        assert "`make bench-peers`" in t["not_run"][name] and str(tmp_path / name) in t["not_run"][name]
    assert rounds <= t["rounds"] <= max_rounds and t["dims"] == list(TINY)
    for v in t["variants"].values():
        assert v["steps_timed"] % block == 0 and v["steps_timed"] <= block * t["rounds"]
        # a variant ran another round only while it had no quiet step
        assert not perf.quiet_steps(v["steps"][: v["steps_timed"] - block] if v["steps_timed"] > block * rounds else [])
        assert [s["in_block"] for s in v["steps"]] == list(range(block)) * (v["steps_timed"] // block)
        assert all({"wall", "cpu", "runq_wait", "minflt"} <= set(s) and s["wall"] > 0 for s in v["steps"])
        assert len(v["warmup_seconds"]) == 1 and v["version"]
        assert v["tokens_per_s"] == TINY[3] / v["best_seconds"]
    assert t["roofline_dtype"] == "fp32" and t["ours_best_precision"] == "fp32" and t["vs_peers"] == {}
    assert t["vs_roofline"] == t["variants"]["sae_sweep/fp32"]["tokens_per_s"] / t["roofline_tokens_per_s"]

    text = perf.table({"machine": perf.machine(), "topk": t})
    lines = text.splitlines()
    for name in ("dictionary_learning", "sparsify"):
        assert f"| TopK train vs {name} | {t['not_run'][name]} | > 1x |  |" in lines
    assert any(
        line.startswith("| TopK train d_in 16, d_sae 64, k 4, batch 32 vs encoder-only roofline |") for line in lines
    )
    assert any(line.startswith("| sae_sweep ") and "trainer=topk step" in line for line in lines)
    assert any(line.startswith("| roofline: torch ") for line in lines)
    assert "| TopK step, d_in 16, d_sae 64, k 4, batch 32 |" in text


@pytest.mark.integration
@pytest.mark.slow  # the CLI end to end: up to 4 worker processes
def test_smoke_run_without_peer_venvs_fails_with_the_make_target_to_run(tmp_path, capsys):
    out = tmp_path / "smoke.json"
    rc = perf.main(_args(["--smoke", "--threads", "1", "--peer-venvs", str(tmp_path / "venvs"), "--out", str(out)]))
    assert rc == 1
    err = capsys.readouterr().err
    assert "not every TopK worker ran" in err and err.count("`make bench-peers`") == 2
    r = json.loads(out.read_text())
    assert r["smoke"] is True and r["topk"]["dims"] == list(perf.SMOKE_DIMS)
    assert {"memory", "reader", "packing", "quality", "cache", "sweep", "packing_jobs"}.isdisjoint(r)
    assert {"sae_sweep/fp32", "matmul/fp32"} <= set(r["topk"]["variants"])
    assert all(v["steps_timed"] == 1 for v in r["topk"]["variants"].values())
    assert "SMOKE RUN" in r["table"]
    # a smoke run gives no verdicts: its figures measure nothing
    assert not any(line.endswith(("| ok |", "| BELOW |")) for line in r["table"].splitlines())


@pytest.mark.unit
def test_an_unknown_peer_is_refused_by_name():
    with pytest.raises(SystemExit, match="unknown \\['saelens'\\]; known: dictionary_learning, sparsify"):
        perf.main(
            _args(["--peers", "saelens", "--skip", "probe,topk,memory,reader,packing,quality,cache,sweep,packing_jobs"])
        )


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    perf.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.unit
def test_topk_dims_default_to_the_figure_s_and_take_the_command_line_s():
    assert perf.topk_dims(_args([])) == (perf.D_IN, perf.D_SAE, perf.K, perf.BATCH) == (768, 12288, 16, 4096)
    assert perf.topk_dims(_args(["--d-in", "768", "--d-sae", "24576", "--k", "32"])) == (768, 24576, 32, perf.BATCH)
    assert perf.topk_dims(_args(["--k", "32"])) == (perf.D_IN, perf.D_SAE, 32, perf.BATCH)
    assert perf.topk_dims(_args(["--smoke"])) == perf.SMOKE_DIMS
    with pytest.raises(SystemExit, match="--smoke runs at SMOKE_DIMS"):
        perf.topk_dims(_args(["--smoke", "--d-sae", "24576"]))
    with pytest.raises(SystemExit, match="--k=64 is more than --d-sae=32"):
        perf.topk_dims(_args(["--d-sae", "32", "--k", "64"]))


@pytest.mark.unit
def test_a_peer_step_refuses_a_gpu_device_before_any_import(capsys):
    """Only ours and the matmul run off the CPU: a peer worker asked for CUDA answers an error
    (which fig_topk reports in place of the figure), never a CPU timing under a GPU label."""
    from sae_sweep.bench import step_worker

    assert (
        step_worker.main(
            ["--impl", "sparsify", "--device", "cuda", "--d-in", "8", "--d-sae", "16", "--k", "2", "--batch", "4"]
        )
        == 1
    )
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(step_worker.MARK)][-1]
    assert "only sae_sweep and matmul run off the CPU" in json.loads(line[len(step_worker.MARK) :])["error"]


@pytest.mark.integration
def test_generation_bench_projects_the_hours_for_100m_tokens_from_its_own_median_rate(tiny_cache_dir, tmp_path):
    """`bench generation --out` records every run and, per combination, the hours 100M tokens take
    at the faster sampler's median wall rate (docs/performance.md's GPU-hours projection is read from it)."""
    import argparse

    from sae_sweep.bench import generation

    p = argparse.ArgumentParser()
    generation.add_arguments(p)
    out = tmp_path / "gen.json"
    args = p.parse_args(
        [
            "--model",
            "tiny",
            "--batches",
            "2",
            "--new-tokens",
            "4",
            "--cache-dir",
            str(tiny_cache_dir),
            "--out",
            str(out),
        ]
    )
    assert generation.main(args) == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and {r["sampler"] for r in res["runs"]} == set(generation.SAMPLERS)
    (row,) = res["summary"]
    best = max(m["tok_s"] for m in row["medians"].values())
    assert row["hours_per_100M_tokens"] == pytest.approx(100_000_000 / best / 3600)


@pytest.mark.unit
def test_gpucheck_without_cuda_reports_the_generation_figure_as_not_run(capsys):
    from sae_sweep.bench import gpucheck

    assert gpucheck.main(["--device", "cpu", "--skip", "tests,steps,runs,eval,bench"]) == 0
    line = f"[bench generation --device cpu {' '.join(gpucheck.GENERATION_ARGS)}] {gpucheck.NOT_RUN}"
    assert line in capsys.readouterr().out


@pytest.mark.unit
def test_temporal_routes_figure_times_both_routes_and_names_the_automatic_one():
    from sae_sweep.bench.trainers import routes_table
    from sae_sweep.sae.temporal_ortho import CoactivationTable, measure_routes

    rows = measure_routes(shapes=((64, 8, 16), (8, 2, 64)), reps=1)
    assert [(r["batch"], r["setup"], r["auto"]) for r in rows] == [
        (64, "published", "gram"),
        (64, "corrected", "gram"),
        (8, "published", "pairs"),
        (8, "corrected", "pairs"),
    ]
    assert all(r["pairs_s"] > 0 and r["gram_s"] > 0 for r in rows)
    lines = routes_table(rows).splitlines()
    assert "auto vs other" in lines[0] and len(lines) == 2 + len(rows)
    with pytest.raises(ValueError, match="route='dense'.*'auto', 'pairs', 'gram'"):
        CoactivationTable(4, route="dense")
