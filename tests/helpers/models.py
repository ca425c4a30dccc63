"""Local model directories with random weights, one per supported architecture family, saved with
save_pretrained next to a tokenizer in the family's hub style (BOS quirks included)."""

from __future__ import annotations

from pathlib import Path

import torch

# Tokenizer styles, as the hub models ship them:
#   gpt2   GPT-2 / Pythia (GPT-NeoX BPE): BOS == EOS == <|endoftext|>, no pad, adds nothing itself;
#   llama  Llama-3: <|begin_of_text|> / <|end_of_text|>, no pad, adds BOS itself (add_bos_token);
#   gemma  Gemma-2: <pad>=0 <eos>=1 <bos>=2 <unk>=3, adds BOS itself (and needs it).
TOKENIZER_STYLES = {
    "gpt2": dict(specials=["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>", pad=None, adds_bos=False),
    "llama": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>"],
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad=None,
        adds_bos=True,
    ),
    "gemma": dict(specials=["<pad>", "<eos>", "<bos>", "<unk>"], bos="<bos>", eos="<eos>", pad="<pad>", adds_bos=True),
}


def _config(family: str, vocab: int, tok) -> object:
    """2 layers, d_model 64: the smallest shapes that still exercise every code path."""
    import transformers as T

    ids = dict(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    common = dict(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, **ids
    )
    if family == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids)
    if family == "pythia":  # parallel residual and partial rotary, as in Pythia
        return T.GPTNeoXConfig(intermediate_size=256, use_parallel_residual=True, rotary_pct=0.25, **common)
    if family == "llama":
        return T.LlamaConfig(num_key_value_heads=2, intermediate_size=128, **common)
    if family == "mistral":
        return T.MistralConfig(num_key_value_heads=2, intermediate_size=128, sliding_window=64, **common)
    if family == "gemma2":  # soft-capped attention and final logits, alternating sliding-window layers
        return T.Gemma2Config(
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            sliding_window=16,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            **common,
        )
    raise ValueError(family)


# family -> (conf/model yaml it stands in for, tokenizer style, hook for its full job)
FAMILIES = {
    "gpt2": ("gpt2", "gpt2", "resid_pre"),
    "pythia": ("pythia-70m", "gpt2", "attn_out"),
    "llama": ("llama-3.2-1b", "llama", "mlp_out"),
    "mistral": ("tiny", "llama", "resid_post"),
    "gemma2": ("gemma-2-2b", "gemma", "resid_post"),
}


def train_tokenizer(style: str, docs):
    """A small byte-level BPE in one of the hub styles (trained in about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    s = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=768,
        special_tokens=s["specials"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    if s["adds_bos"]:
        bos_id = tok.token_to_id(s["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{s['bos']} $A", pair=f"{s['bos']} $A {s['bos']} $B", special_tokens=[(s["bos"], bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=s["bos"],
        eos_token=s["eos"],
        unk_token=s["specials"][-1] if style == "gemma" else s["eos"],
        pad_token=s["pad"],
    )


def build_family_dir(family: str, root: Path, docs) -> Path:
    """save_pretrained directory (model + tokenizer) of a random-weight ``family`` model."""
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(FAMILIES[family][1], docs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, len(tok), tok))
    # Random init leaves Gemma-2's sandwich norms at scale 1 exactly; perturb every parameter so no
    # sub-block output is accidentally zero or symmetric.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    d = root / family
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
