"""An in-memory language model with the core eval's interface (``activations``,
``logits_with_splice``) and a fixed linear SAE, for evals on small HF models in the unit tier."""

from __future__ import annotations

import torch
from transformers import GPT2LMHeadModel


class HFResidPostLM:
    """Minimal test adapter: ``activations`` / ``logits_with_splice`` at resid_post of a HF GPT-2,
    via forward hooks on ``transformer.h[layer]`` (the real one lives in sae_sweep.models.lm)."""

    def __init__(self, model: GPT2LMHeadModel):
        self.model = model.eval()  # no dropout
        self.device = torch.device("cpu")

    def _run(self, input_ids, layer, hook, fn):
        assert hook == "resid_post"
        seen = {}

        def on_block(module, inputs, output):
            act = output[0] if isinstance(output, tuple) else output
            seen["act"] = act
            if fn is None:
                return None
            new = fn(act)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = self.model.transformer.h[layer].register_forward_hook(on_block)
        try:
            logits = self.model(input_ids).logits
        finally:
            handle.remove()
        return seen["act"], logits

    def activations(self, input_ids, layer, hook):
        return self._run(input_ids, layer, hook, None)[0]

    def logits_with_splice(self, input_ids, layer, hook, fn):
        return self._run(input_ids, layer, hook, fn)[1]


class LinearSAE(torch.nn.Module):
    """x_hat = scale * x; latents = relu of a fixed random projection (so sparsity stats are real)."""

    def __init__(self, d_in=32, d_sae=48, scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g))
        self.b_enc = torch.nn.Parameter(torch.full((d_sae,), -2.0))
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=g))
        self.scale = scale

    def forward(self, x):
        f = torch.relu(x @ self.W_enc + self.b_enc)
        return x * self.scale, f
