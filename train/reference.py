"""The benchmark's comparator: GPT-2 as nanoGPT writes it with bias=False (learned positions,
LayerNorm, fused QKV, causal SDPA, GELU MLP at 4·d, tied embeddings). It has about the same
matrix-product FLOPs per token as posleak's decoder at equal width, depth and context
(SwiGLU at 8/3·d, rounded up to a multiple of 32, matches a 4·d GELU MLP within 3% at d = 128,
exactly at d = 384), so their speed ratio measures overhead."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.attn_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int, n_head: int, d_model: int, max_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(Block(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe.weight[: tokens.shape[1]]
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class TransformersLlama(nn.Module):
    """transformers' LlamaForCausalLM at posleak's shape, with the config `posleak export`
    writes (RMSNorm, SwiGLU at the same width, RoPE at the same base, no biases, the same
    embedding tying), on SDPA attention: what a user would train instead of posleak. Needs
    the hf extra (pip install -e '.[hf]' in posleak's clone)."""

    def __init__(self, cfg, T: int):
        super().__init__()
        from transformers import LlamaForCausalLM

        from posleak.model import Decoder
        from posleak.train.export import hf_config

        config = hf_config(Decoder(cfg), {}, T)
        config._attn_implementation = "sdpa"
        self.hf = LlamaForCausalLM(config)
        self.layers, self.lm_head = self.hf.model.layers, self.hf.lm_head  # for the FLOP count

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits
