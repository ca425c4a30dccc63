"""text.py: BOS-prefixed windows, disjoint splits, local files, faithful generation, offline hub."""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network in tests

import numpy as np
import pytest
import torch

from sae_sweep.config import GenerationConfig, ModelConfig
from sae_sweep.data.corpus import WindowPacker, doc_split
from sae_sweep.data.text import (
    DatasetUnavailable,
    NotEnoughText,
    check_dataset_available,
    dataset_fingerprint,
    generations,
    iter_split_documents,
    token_windows,
)
from sae_sweep.models.lm import load_lm

SAMPLER = GenerationConfig().sampler  # the manifest records the sampler the settings left at its default


@pytest.fixture(scope="session")
def llama_lm(tmp_path_factory):
    """A random tiny Llama whose tokenizer has distinct BOS / EOS / PAD (unlike GPT-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="</s>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    )
    d = tmp_path_factory.mktemp("llama_text")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return load_lm(ModelConfig(name="llama-rand", hf_id=str(d), dtype="float32"), d, "cpu")


def _assert_bos_windows(w: torch.Tensor, lm, ctx: int, strict: bool) -> None:
    assert w.dtype == torch.long and w.shape[1] == ctx
    assert (w[:, 0] == lm.bos_token_id).all()
    assert (w[:, 1] != lm.bos_token_id).all()  # never a doubled BOS
    if strict:  # BOS != EOS: BOS occurs exactly once per window
        assert ((w == lm.bos_token_id).sum(dim=1) == 1).all()


# Packing
@pytest.mark.unit
def test_packer_windows_start_with_one_bos():
    p = WindowPacker(bos_id=0, sep_id=0, context_size=4, n_seqs=3)
    p.add_many([[5, 6, 7], [8], [9, 10, 11, 12]])
    # stream: 5 6 7 | 0 8 0 9 10 11 12 0 ; chunks of 3, separator dropped at chunk start
    assert p.result().tolist() == [[0, 5, 6, 7], [0, 8, 0, 9], [0, 10, 11, 12]]


# builtin
@pytest.mark.integration
def test_builtin_windows(llama_lm, tmp_path):
    cfg = {"name": "builtin", "kind": "builtin", "context_size": 32}
    from sae_sweep.data.corpus import builtin_documents

    docs = builtin_documents(tmp_path)
    assert sum(len(d) for d in docs) > 1_000_000
    assert (tmp_path / "text").is_dir()  # cached on disk
    n_eval = sum(doc_split(d) == "eval" for d in docs)
    assert 0.05 < n_eval / len(docs) < 0.15

    train = token_windows(cfg, llama_lm, "train", 2000, tmp_path)
    ev = token_windows(cfg, llama_lm, "eval", 1000, tmp_path)
    assert train.shape == (63, 32) and ev.shape == (32, 32)  # ceil(n_tokens / ctx) windows
    _assert_bos_windows(train, llama_lm, 32, strict=True)
    _assert_bos_windows(ev, llama_lm, 32, strict=True)
    # Cached: the same windows come back from disk.
    cached = list((tmp_path / "tokens").glob("builtin-train-*.npy"))
    assert len(cached) == 1 and cached[0].with_suffix(".json").exists()
    assert torch.equal(token_windows(cfg, llama_lm, "train", 2000, tmp_path), train)

    # Disjoint: no document is in both splits.
    tr = {tuple(d) for _, d in zip(range(300), iter_split_documents(cfg, llama_lm, "train", tmp_path))}
    ev_docs = {tuple(d) for _, d in zip(range(300), iter_split_documents(cfg, llama_lm, "eval", tmp_path))}
    assert tr and ev_docs and not (tr & ev_docs)


@pytest.mark.integration
def test_builtin_windows_tiny(tiny_lm, tiny_cache_dir):
    cfg = {"name": "builtin", "kind": "builtin", "context_size": 64}
    w = token_windows(cfg, tiny_lm, "eval", 8192, tiny_cache_dir)
    assert w.shape == (128, 64)
    _assert_bos_windows(w, tiny_lm, 64, strict=False)  # tiny: BOS == EOS == <|endoftext|>
    text = tiny_lm.tokenizer.decode(w[0, 1:])
    assert len(text.split()) > 5


# local files
def _docs(n: int, tag: str):
    return [f"{tag} document number {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(n)]


@pytest.mark.integration
def test_local_files_jsonl_parquet_txt_csv(llama_lm, tmp_path):
    import pandas as pd

    docs = _docs(400, "local")
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    parquet = tmp_path / "a.parquet"
    pd.DataFrame({"body": docs}).to_parquet(parquet)
    csv = tmp_path / "a.csv"
    pd.DataFrame({"body": docs}).to_csv(csv, index=False)
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(docs) + "\n")

    results = {}
    for path, column in ((jsonl, "body"), (parquet, "body"), (csv, "body"), (txt, "text")):
        cfg = {
            "name": "local",
            "kind": "local",
            "data_files": [str(path)],
            "text_column": column,
            "context_size": 16,
            "eval_tokens": 16 * 4,
        }
        check_dataset_available(cfg)
        train = token_windows(cfg, llama_lm, "train", 16 * 20, tmp_path / "cache")
        ev = token_windows(cfg, llama_lm, "eval", 16 * 4, tmp_path / "cache")
        _assert_bos_windows(train, llama_lm, 16, strict=True)
        _assert_bos_windows(ev, llama_lm, 16, strict=True)
        results[path.suffix] = (train, ev)
        # Windows decode to text of the requested split only.
        eval_tags = {d.split(":")[0] for d in docs if doc_split(d) == "eval"}
        decoded = llama_lm.tokenizer.decode(ev.flatten(), skip_special_tokens=True)
        numbers = {
            f"local document number {s.split(':')[0].strip()}" for s in decoded.split("local document number")[1:-1]
        }
        assert numbers and numbers <= eval_tags
    # Same documents, same tokens, whatever the file format.
    for suffix in (".parquet", ".csv", ".txt"):
        assert torch.equal(results[suffix][0], results[".jsonl"][0])

    # Fingerprints follow file content.
    cfg = {"name": "local", "kind": "local", "data_files": [str(jsonl)], "text_column": "body"}
    fp = dataset_fingerprint(cfg, llama_lm)
    jsonl.write_text(jsonl.read_text() + json.dumps({"body": "one more"}) + "\n")
    assert dataset_fingerprint(cfg, llama_lm) != fp

    with pytest.raises(NotEnoughText, match="requested"):
        token_windows({**cfg, "name": "local", "context_size": 16}, llama_lm, "eval", 100_000, tmp_path / "cache")
    with pytest.raises(DatasetUnavailable, match="no such file"):
        check_dataset_available({"name": "local", "kind": "local", "data_files": [str(tmp_path / "missing.jsonl")]})
    with pytest.raises(DatasetUnavailable, match="unsupported extension"):
        check_dataset_available({"name": "local", "kind": "local", "data_files": [str(tmp_path / "a.jsonl"), __file__]})


@pytest.mark.integration
def test_local_bad_text_column(llama_lm, tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text("".join(json.dumps({"body": d}) + "\n" for d in _docs(50, "x")))
    cfg = {"name": "local", "kind": "local", "data_files": [str(f)], "text_column": "text", "context_size": 16}
    with pytest.raises(ValueError, match="text_column"):
        token_windows(cfg, llama_lm, "train", 64, tmp_path)


@pytest.mark.integration
def test_local_html_pages_give_one_document_per_prose_paragraph(llama_lm, tmp_path):
    """HTML documentation as a dataset: paragraphs that read as prose, nothing from code, tables,
    navigation or scripts; the same documents as a jsonl of those paragraphs."""
    prose = [
        f"Paragraph {i} explains, in plain words that any reader can follow, how the system keeps "
        f"its records safe when many people change them at the same time and why that matters."
        for i in range(300)
    ]
    page = (
        "<html><head><script>var p = '<p>not text</p>';</script><style>p {}</style></head><body>"
        "<div class='navheader'><p>Prev Up Next</p></div>"
        + "".join(
            f"<p>{p} See <em>VACUUM</em>\n  too.</p>" if i % 2 else f"<div class='para'>{p}</div>"
            for i, p in enumerate(prose[:150])
        )
        + "<pre>SELECT * FROM t WHERE a = b;</pre><p>x = f(a.b, c[d]) / g_h(i) { j } k.l m_n o(p) q.r s_t u=v "
        "w(x) y.z a_b c(d) e.f g_h</p></body></html>"
    )
    (tmp_path / "a.html").write_text(page)
    (tmp_path / "b.htm").write_text("<p>" + "</p><p>".join(prose[150:]) + "</p><p>Too short to count.</p>")
    (tmp_path / "c.html").write_text(
        "<html><body><table><tr><td>an index page: no prose</td></tr></table></body></html>"
    )
    cfg = {
        "name": "docs",
        "kind": "local",
        "data_files": [str(tmp_path / "*.htm*")],
        "context_size": 16,
        "eval_tokens": 64,
    }
    check_dataset_available(cfg)
    docs = [llama_lm.tokenizer.decode(d) for d in iter_split_documents(cfg, llama_lm, "train", tmp_path / "c")]
    want = [f"{p} See VACUUM too." if i < 150 and i % 2 else p for i, p in enumerate(prose)]
    assert docs == [w for w in want if doc_split(w) == "train"]

    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"text": w}) + "\n" for w in want))
    from_jsonl = {"name": "docs", "kind": "local", "data_files": [str(jsonl)], "context_size": 16}
    assert torch.equal(
        token_windows(cfg, llama_lm, "train", 16 * 30, tmp_path / "c"),
        token_windows(from_jsonl, llama_lm, "train", 16 * 30, tmp_path / "c"),
    )
    assert dataset_fingerprint(cfg, llama_lm)["html"].startswith("html-paragraphs-v1")

    missing = {**cfg, "data_files": ["/nonexistent/doc-*/html/*.html"], "how_to_get": "apt-get install the-docs"}
    with pytest.raises(DatasetUnavailable, match=r"no file matches; apt-get install the-docs"):
        check_dataset_available(missing)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "i.html").write_text("<p>Index</p>")
    with pytest.raises(DatasetUnavailable, match="no paragraph reads as prose"):
        check_dataset_available({**cfg, "data_files": [str(tmp_path / "none" / "i.html")]})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.html").write_bytes(b"<p>\xff\xfe caf\xe9</p>")
    with pytest.raises(DatasetUnavailable, match="not UTF-8"):
        check_dataset_available({**cfg, "data_files": [str(tmp_path / "bad" / "x.html")]})


# hub, offline
@pytest.mark.integration
def test_offline_hub_dataset_fails_fast(llama_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {
        "name": "fineweb",
        "kind": "hub",
        "hf_id": "HuggingFaceFW/fineweb",
        "hf_config": "sample-10BT",
        "split": "train",
        "text_column": "text",
        "streaming": True,
        "context_size": 64,
    }
    t0 = time.time()
    with pytest.raises(DatasetUnavailable) as err:
        check_dataset_available(cfg)
    assert time.time() - t0 < 2
    msg = str(err.value)
    assert "HuggingFaceFW/fineweb" in msg and "dataset=local dataset.data_files=[" in msg
    with pytest.raises(DatasetUnavailable):
        token_windows(cfg, llama_lm, "train", 1000, tmp_path)
    assert dataset_fingerprint(cfg, llama_lm)["hf_id"] == "HuggingFaceFW/fineweb"


# faithful
@pytest.mark.integration
def test_faithful_generation_is_cached_resumable_and_text_like(tiny_lm, tiny_cache_dir, tmp_path):
    gen = {
        "max_new_tokens": 32,
        "temperature": 1.0,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "batch_size": 16,
        "seed": 0,
    }
    cfg = {"name": "faithful", "kind": "faithful", "context_size": 32, "generation": gen}
    cache = tmp_path / "cache"
    ev = token_windows(cfg, tiny_lm, "eval", 32 * 6, cache)
    _assert_bos_windows(ev, tiny_lm, 32, strict=False)

    root = generations(cfg, tiny_lm, cache).root
    chunks = sorted(root.glob("chunk_*.npz"))
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["generation"] == {**gen, "sampler": SAMPLER} and manifest["chunks"] == len(chunks) >= 2
    assert manifest["model"]["tokenizer_hash"] == tiny_lm.fingerprint["tokenizer_hash"]
    assert not list(root.glob("locks/*.lock")) and not list(root.glob(".*.tmp"))

    # Text-like: mostly words, not byte soup.
    docs = list(zip(range(20), iter_split_documents(cfg, tiny_lm, "train", cache)))
    text = " ".join(tiny_lm.tokenizer.decode(d) for _, d in docs)
    words = text.split()
    alpha = sum(w.strip(".,:;()[]'\"`").isalpha() for w in words) / len(words)
    assert len(words) > 50 and alpha > 0.5, text[:400]

    # Resume: a run killed after chunk 0 leaves whole chunks only; the next run regenerates the
    # rest and ends up with exactly the same windows.
    for c in chunks[1:]:
        c.unlink()
    for f in (cache / "tokens").glob("*"):
        f.unlink()
    again = token_windows(cfg, tiny_lm, "eval", 32 * 6, cache)
    assert torch.equal(again, ev)
    assert sorted(root.glob("chunk_*.npz")) == chunks

    # The train split draws from the same chunks, disjoint from eval; more budget extends them.
    token_windows(cfg, tiny_lm, "train", 32 * 40, cache)
    tr = {tuple(d) for d in _take(iter_split_documents(cfg, tiny_lm, "train", cache), 60)}
    evd = {tuple(d) for d in _take(iter_split_documents(cfg, tiny_lm, "eval", cache), 5)}
    assert tr and evd and not (tr & evd)

    # Different generation settings: a different directory and fingerprint.
    other = {**cfg, "generation": {**gen, "seed": 1}}
    assert generations(other, tiny_lm, cache).root != root
    assert dataset_fingerprint(other, tiny_lm) != dataset_fingerprint(cfg, tiny_lm)


def _take(it, n):
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    it.close()
    return out


FAITHFUL_KILL_SCRIPT = """
import sys
from sae_sweep.config import ModelConfig
from sae_sweep.models.lm import load_lm
from sae_sweep.data.text import token_windows
model_dir, cache, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lm = load_lm(ModelConfig(name="llama-rand", hf_id=model_dir, dtype="float32"), cache, "cpu")
gen = {"max_new_tokens": 32, "temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.1, "batch_size": 8, "seed": 3}
token_windows({"name": "faithful", "kind": "faithful", "context_size": 32, "generation": gen}, lm, "train", n, cache)
"""


@pytest.mark.integration
@pytest.mark.slow
def test_faithful_generation_killed_midway_resumes_to_the_same_text(llama_lm, tmp_path):
    """SIGKILL a generating process (no cleanup at all), rerun: the chunks it finished are reused as
    they are, its dead lock is taken over, and the text equals an uninterrupted run's."""
    import signal
    import subprocess
    import sys

    model_dir = llama_lm.fingerprint["path"]
    n = 32 * 80  # ~11 chunks of 8 sequences
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", FAITHFUL_KILL_SCRIPT, model_dir]
    killed_cache = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(killed_cache), str(n)], env=env, stderr=subprocess.DEVNULL)
    chunks_dir = killed_cache / "faithful"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(chunks_dir.glob("*/chunk_*.npz"))) < 3:
        assert proc.poll() is None, "generation ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (root,) = list(chunks_dir.iterdir())
    before = {p.name: p.stat().st_mtime_ns for p in root.glob("chunk_*.npz")}
    dead_locks = list(root.glob("locks/*.lock"))  # the chunk (or manifest) lock it held, if any
    assert not list((killed_cache / "tokens").glob("*.npy"))  # it was killed before finishing

    subprocess.run([*cmd, str(killed_cache), str(n)], env=env, check=True, capture_output=True, timeout=600)
    after = {p.name: p.stat().st_mtime_ns for p in root.glob("chunk_*.npz")}
    assert not any(p.exists() for p in dead_locks)  # taken over and released
    assert len(after) > len(before) and all(after[name] == t for name, t in before.items())
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["chunks"] == len(after) and manifest["generation"]["seed"] == 3
    assert manifest["generation"]["batch_size"] == 8 and manifest["prompt"] == "BOS only"

    clean_cache = tmp_path / "clean"
    subprocess.run([*cmd, str(clean_cache), str(n)], env=env, check=True, capture_output=True, timeout=600)
    (clean_root,) = list((clean_cache / "faithful").iterdir())
    assert sorted(p.name for p in clean_root.glob("chunk_*.npz")) == sorted(after)
    for name in after:  # same sequences, chunk by chunk
        with np.load(root / name) as a, np.load(clean_root / name) as b:
            assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["lengths"], b["lengths"])
    (w_killed,) = list((killed_cache / "tokens").glob("*.npy"))
    (w_clean,) = list((clean_cache / "tokens").glob("*.npy"))
    assert np.array_equal(np.load(w_killed), np.load(w_clean))
