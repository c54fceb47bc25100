"""GPT-2 as a spam classifier in PyTorch, written the usual way, for timing npgpt against.

Standard modules only: nn.Embedding, nn.LayerNorm, nn.Linear (q, k, v in one c_attn as GPT-2
has it), GELU in its tanh form, and causal attention through F.scaled_dot_product_attention
(PyTorch's fused kernel, `attention="sdpa"`, the default) or written out with a -inf mask and a
softmax as the reference book does (`attention="manual"`).

    x = wte[ids] + wpe[0:T]                                    # [B,T,C]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))   (pre-LN, no dropout)
    logits = cls(ln_f(x[b, pos_b]))                            # [B,K] at one position per row

The trainable set is the reference's: the last `trainable_blocks` blocks, ln_f and the head;
everything else has requires_grad False, so autograd stops at the first trainable block.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, attention: str = "sdpa"):
        super().__init__()
        self.n_head, self.attention = n_head, attention
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = (a.view(B, T, H, D).transpose(1, 2)
                   for a in self.c_attn(x).split(C, dim=-1))         # [B,H,T,D] each
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # [B,H,T,D]
        else:
            scores = (q @ k.transpose(-2, -1)) * D ** -0.5           # [B,H,T,T]
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)
            y = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))        # [B,T,C]


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, attention: str = "sdpa"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(n_embd, n_head, attention)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2Classifier(nn.Module):
    def __init__(self, n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_ctx=1024,
                 num_classes=2, attention="sdpa"):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_ctx, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, attention) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.cls = nn.Linear(n_embd, num_classes)

    def forward(self, ids, pos=None):
        """ids [B,T] int64, pos [B] (default T-1, the reference's last position) -> logits [B,K]"""
        B, T = ids.shape
        x = self.wte(ids) + self.wpe(torch.arange(T))                # [B,T,C]
        for block in self.h:
            x = block(x)
        pos = torch.full((B,), T - 1) if pos is None else torch.as_tensor(pos)
        return self.cls(self.ln_f(x[torch.arange(B), pos]))          # [B,K]

    def train_only_last(self, trainable_blocks=1):
        """requires_grad on the last `trainable_blocks` blocks, ln_f and the head only."""
        for p in self.parameters():
            p.requires_grad_(False)
        for m in [*self.h[len(self.h) - trainable_blocks:], self.ln_f, self.cls]:
            for p in m.parameters():
                p.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]


def init_gpt2(model: GPT2Classifier, seed=123):
    """GPT-2's initialisation: weights N(0, 0.02), biases 0, LayerNorm gains 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model


def from_npgpt(params: dict, config, attention="sdpa") -> GPT2Classifier:
    """A GPT2Classifier holding a copy of npgpt's parameters (npgpt's [in,out] linear weights are
    transposed into nn.Linear's [out,in])."""
    m = GPT2Classifier(config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.n_ctx,
                       params["cls/b"].shape[0], attention)
    pairs = {"wte": m.wte.weight, "wpe": m.wpe.weight, "ln_f/g": m.ln_f.weight, "ln_f/b": m.ln_f.bias,
             "cls/w": m.cls.weight, "cls/b": m.cls.bias}
    for i, blk in enumerate(m.h):
        for name, mod in (("ln_1", blk.ln_1), ("ln_2", blk.ln_2)):
            pairs[f"h{i}/{name}/g"], pairs[f"h{i}/{name}/b"] = mod.weight, mod.bias
        for name, mod in (("attn/c_attn", blk.attn.c_attn), ("attn/c_proj", blk.attn.c_proj),
                          ("mlp/c_fc", blk.c_fc), ("mlp/c_proj", blk.c_proj)):
            pairs[f"h{i}/{name}/w"], pairs[f"h{i}/{name}/b"] = mod.weight, mod.bias
    with torch.no_grad():
        for name, t in pairs.items():
            a = np.asarray(params[name], np.float32)
            t.copy_(torch.from_numpy(np.ascontiguousarray(a.T if t.ndim == 2 and name not in ("wte", "wpe") else a)))
    return m
