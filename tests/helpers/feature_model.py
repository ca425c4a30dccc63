"""A constructed language model and SAE whose latent 0 has a known answer: it fires only on the token
" cat" (activation 9: embedding 10 * e_0, encoder e_0, bias -1) and its decoder direction promotes
" park" and suppresses " tree" through the unembedding. The other latents are random."""

from __future__ import annotations

import torch

from helpers.models import train_tokenizer

DOCS = ["the cat sat on the mat and the dog ran to the park", "a bird sang in the tree while the sun rose"] * 20
D_MODEL = 64
D_SAE = 32
ACT = 9.0  # latent 0's activation on " cat"
WINDOW = 16


def constructed(sae_seed: int = 1) -> dict:
    """``lm`` (a 2-layer Llama, in memory), ``sae`` (ReLU, random but for latent 0), ``tokens``
    (BOS-prefixed held-out windows), ``tok`` and the ids ``cat``, ``promoted``, ``suppressed``."""
    import transformers as T

    from sae_sweep.models.lm import LanguageModel
    from sae_sweep.sae import get_sae_class

    tok = train_tokenizer("llama", DOCS)
    cfg = T.LlamaConfig(
        vocab_size=len(tok), hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(cfg)
    cat, promoted, suppressed = (tok.convert_tokens_to_ids(t) for t in ("Ġcat", "Ġpark", "Ġtree"))
    with torch.no_grad():
        # resid_pre of layer 0 is the token embedding: only " cat" has a component along e_0
        emb = model.get_input_embeddings().weight
        emb[:, 0] = 0
        emb[cat, 0] = 10.0
        head = model.get_output_embeddings().weight
        head[:, 0] = 0
        head[promoted, 0], head[suppressed, 0] = 5.0, -5.0
    lm = LanguageModel(model, tok, "cpu", {"name": "constructed"})
    sae = get_sae_class("relu")(D_MODEL, D_SAE, generator=torch.Generator().manual_seed(sae_seed))
    with torch.no_grad():
        sae.W_enc[0, :] = 0  # no latent but 0 reads e_0 ...
        sae.W_enc[:, 0] = torch.nn.functional.one_hot(torch.tensor(0), D_MODEL).float()
        sae.b_enc[0] = -1.0
        sae.W_dec[0] = sae.W_enc[:, 0]  # ... and latent 0 writes it
    flat = [i for d in DOCS for i in tok.encode(d, add_special_tokens=False)]
    step = WINDOW - 1
    tokens = torch.tensor([[lm.bos_token_id] + flat[s : s + step] for s in range(0, len(flat) - WINDOW, step)])
    return dict(lm=lm, sae=sae, tokens=tokens, tok=tok, cat=cat, promoted=promoted, suppressed=suppressed)
