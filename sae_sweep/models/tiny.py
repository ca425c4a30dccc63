"""The ``tiny`` model's recipe: a 4-layer GPT-2 (d_model 128) with a byte-level BPE tokenizer,
both trained on the built-in corpus by a short deterministic run and saved with ``save_pretrained``.

``build(out_dir, cache_dir)`` writes the model, its tokenizer and ``build_info.json`` (written last)
into ``out_dir``. Where it is built and that it is built once per machine is the builtin weights
source's business (``sae_sweep.models.weights.builtin``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from sae_sweep.data.corpus import WindowPacker, builtin_corpus_id, builtin_documents, doc_split
from sae_sweep.util.files import sha1_file
from sae_sweep.util.progress import Progress

__all__ = ["TINY_VERSION", "TINY_ARCH", "TINY_VOCAB", "TINY_SPECIAL", "TINY_TRAIN", "build"]

log = logging.getLogger(__name__)

# Bump when the tiny model's recipe changes: a new directory is built, old caches stay valid.
TINY_VERSION = "tiny-v2"
# Must match conf/model/tiny.yaml (n_layers, d_model).
TINY_ARCH: Dict[str, Any] = dict(n_layer=4, n_embd=128, n_head=4, n_positions=512)
TINY_VOCAB = 2048
TINY_SPECIAL = {"eos": "<|endoftext|>", "pad": "<|pad|>"}
# Training recipe: fixed step count (never time-based) so the build is deterministic. The loop is
# most of the build, and its cost is matmul FLOPs per token: a small vocabulary makes the LM head
# cheap, context 128 keeps attention cheap (and covers faithful's BOS + 128 new tokens but one).
# One thread: on a busy 2-core machine a second torch thread mostly spin-waits (measured 3.5x the
# CPU time per step under load), and the thread count is part of the recipe (reduction order).
TINY_TRAIN: Dict[str, Any] = dict(
    seed=0, context=128, batch=16, steps=240, lr=1e-2, warmup=20, weight_decay=0.01, grad_clip=1.0, threads=1
)


def _train_tokenizer(train_docs: List[str]):
    """Byte-level BPE (GPT-2 style) with ``<|endoftext|>`` (BOS/EOS/UNK) and ``<|pad|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=[TINY_SPECIAL["eos"], TINY_SPECIAL["pad"]],  # ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=TINY_SPECIAL["eos"],
        eos_token=TINY_SPECIAL["eos"],
        unk_token=TINY_SPECIAL["eos"],
        pad_token=TINY_SPECIAL["pad"],
        model_max_length=TINY_ARCH["n_positions"],
    )


def _pack(token_lists: Sequence[Sequence[int]], eos_id: int, context: int) -> torch.Tensor:
    n_tok = sum(len(t) + 1 for t in token_lists)
    packer = WindowPacker(eos_id, eos_id, context, max(1, n_tok // (context - 1) - 1))
    packer.add_many(token_lists)
    return packer.result()


def build(out_dir: Path, cache_dir: str | os.PathLike) -> None:
    """Corpus -> tokenizer -> GPT-2 -> a short deterministic training run -> save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    # Fixed thread count: CPU reductions are chunked by thread count, so it is part of the recipe.
    torch.set_num_threads(TINY_TRAIN["threads"])
    try:
        docs = builtin_documents(cache_dir)
        timings = {"corpus": time.time() - t0}
        train_docs = [d for d in docs if doc_split(d) == "train"]
        eval_docs = [d for d in docs if doc_split(d) == "eval"]
        tokenizer = _train_tokenizer(train_docs)
        timings["tokenizer"] = time.time() - t0 - sum(timings.values())
        eos = tokenizer.eos_token_id
        enc = lambda ds: [e.ids for e in tokenizer.backend_tokenizer.encode_batch(ds, add_special_tokens=False)]  # noqa: E731
        train_ids, eval_ids = enc(train_docs), enc(eval_docs)
        ctx = TINY_TRAIN["context"]
        data, eval_data = _pack(train_ids, eos, ctx), _pack(eval_ids, eos, ctx)

        # Entropy of the unigram distribution: the loss a context-free model would reach.
        counts = torch.bincount(data[:, 1:].reshape(-1), minlength=len(tokenizer)).double()
        p = counts[counts > 0] / counts.sum()
        unigram_entropy = float(-(p * p.log()).sum())

        torch.manual_seed(TINY_TRAIN["seed"])
        config = GPT2Config(
            vocab_size=len(tokenizer),
            **TINY_ARCH,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,  # one short epoch: nothing to regularise
            bos_token_id=eos,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # the loss HF falls back to, named (no "unrecognized" warning)
        model.train()
        opt = torch.optim.AdamW(
            model.parameters(), lr=TINY_TRAIN["lr"], betas=(0.9, 0.95), weight_decay=TINY_TRAIN["weight_decay"]
        )
        steps, warmup, lr = TINY_TRAIN["steps"], TINY_TRAIN["warmup"], TINY_TRAIN["lr"]
        gen = torch.Generator().manual_seed(TINY_TRAIN["seed"])
        losses: List[float] = []
        timings["tokenize_and_pack"] = time.time() - t0 - sum(timings.values())
        bar = Progress(f"building {TINY_VERSION}", total=steps, unit="step")
        for step in range(steps):
            # Linear warmup, cosine decay to 10%.
            scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            batch = data[torch.randint(0, data.shape[0], (TINY_TRAIN["batch"],), generator=gen)]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), TINY_TRAIN["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix({"loss": f"{losses[-1]:.3f}"})
        bar.close()
        timings["train"] = time.time() - t0 - sum(timings.values())

        model.eval()
        with torch.inference_mode():
            eval_loss = float(model(input_ids=eval_data[:64], labels=eval_data[:64]).loss)

        out_dir.mkdir(parents=True, exist_ok=True)  # build_once hands over an empty directory
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        info = {
            "version": TINY_VERSION,
            "corpus": builtin_corpus_id(),
            "n_train_docs": len(train_docs),
            "n_train_tokens": int(sum(len(t) for t in train_ids)),
            "train": TINY_TRAIN,
            "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
            "eval_loss": eval_loss,
            "unigram_entropy": unigram_entropy,
            "weights_hash": sha1_file(out_dir / "model.safetensors"),
            "build_seconds": round(time.time() - t0, 1),
            "stage_seconds": {k: round(v, 1) for k, v in timings.items()},
            "torch": torch.__version__,
        }
        with open(out_dir / "build_info.json", "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
        log.info(
            "built %s in %.1fs: eval loss %.3f (unigram entropy %.3f)",
            TINY_VERSION,
            info["build_seconds"],
            eval_loss,
            unigram_entropy,
        )
    finally:
        torch.set_num_threads(prev_threads)
