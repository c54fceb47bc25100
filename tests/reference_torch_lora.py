"""A PyTorch GPT-2 with LoRA, used only by the tests as an independent reference for npgpt's LoRA.

Written from the description of appendix E of "Build a Large Language Model (From Scratch)", with
standard modules and autograd, not from npgpt's code:

    LoRALayer(in, out, rank, alpha):  A [in,rank] (kaiming_uniform_, a=sqrt(5)), B [rank,out] = 0,
                                      forward(x) = alpha / rank * (x @ A @ B)
    LinearWithLoRA(linear):           linear(x) + lora(x); the wrapped nn.Linear is frozen

The model has separate query, key and value nn.Linear layers (as appendix E's GPT does), so the
fused c_attn of an npgpt parameter dict is split into its three column blocks on the way in.
Every nn.Linear (q, k, v, the attention output projection, both MLP layers, the classification
head) is wrapped; every other parameter is frozen. Pooling: the last real token.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALayer(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha, self.rank = alpha, rank

    def forward(self, x):
        return (self.alpha / self.rank) * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear: nn.Linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


class Attention(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.W_query, self.W_key, self.W_value = nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.H, C // self.H
        q = self.W_query(x).view(B, T, H, D).transpose(1, 2)       # [B,H,T,D]
        k = self.W_key(x).view(B, T, H, D).transpose(1, 2)
        v = self.W_value(x).view(B, T, H, D).transpose(1, 2)
        s = q @ k.transpose(-2, -1) / math.sqrt(D)                 # [B,H,T,T]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        att = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(C, eps=1e-5), nn.LayerNorm(C, eps=1e-5)
        self.att = Attention(C, H)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        x = x + self.att(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class GPTClassifier(nn.Module):
    def __init__(self, cfg, num_classes=2):
        super().__init__()
        C = cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.n_ctx, C)
        self.blocks = nn.ModuleList(Block(C, cfg.n_head) for _ in range(cfg.n_layer))
        self.final_norm = nn.LayerNorm(C, eps=1e-5)
        self.out_head = nn.Linear(C, num_classes)

    def forward(self, ids, lengths):
        T = ids.shape[1]
        x = self.tok_emb(ids) + self.pos_emb(torch.arange(T))
        for b in self.blocks:
            x = b(x)
        x = self.final_norm(x)
        last = torch.as_tensor(np.asarray(lengths), dtype=torch.long) - 1
        return self.out_head(x[torch.arange(ids.shape[0]), last])  # [B,K]


def replace_linear_with_lora(module, rank, alpha):
    """Appendix E's helper: every nn.Linear below module becomes a LinearWithLoRA."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, LinearWithLoRA(child, rank, alpha))
        else:
            replace_linear_with_lora(child, rank, alpha)


# ----------------------------------------------------------------------------- npgpt <-> torch

def _linears(model):
    """npgpt prefix -> the (wrapped) layer, and for c_attn's parts the column block."""
    out = {}
    for i, b in enumerate(model.blocks):
        for j, part in enumerate(("W_query", "W_key", "W_value")):
            out[f"h{i}/attn/c_attn/{'qkv'[j]}"] = (getattr(b.att, part), f"h{i}/attn/c_attn", j)
        out[f"h{i}/attn/c_proj"] = (b.att.out_proj, f"h{i}/attn/c_proj", None)
        out[f"h{i}/mlp/c_fc"] = (b.fc1, f"h{i}/mlp/c_fc", None)
        out[f"h{i}/mlp/c_proj"] = (b.fc2, f"h{i}/mlp/c_proj", None)
    out["cls"] = (model.out_head, "cls", None)
    return out


def build(params, cfg, rank, alpha, dtype=torch.float32):
    """A GPTClassifier with LoRA everywhere, holding a copy of npgpt's params (base weights and
    the LoRA pairs `<prefix>/lora_A`, `/lora_B`). Only the LoRA pairs require gradients."""
    C = cfg.n_embd
    model = GPTClassifier(cfg, params["cls/b"].shape[0])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    with torch.no_grad():
        model.tok_emb.weight.copy_(t(params["wte"]))
        model.pos_emb.weight.copy_(t(params["wpe"]))
        for i, b in enumerate(model.blocks):
            for ln, name in ((b.norm1, "ln_1"), (b.norm2, "ln_2")):
                ln.weight.copy_(t(params[f"h{i}/{name}/g"]))
                ln.bias.copy_(t(params[f"h{i}/{name}/b"]))
        model.final_norm.weight.copy_(t(params["ln_f/g"]))
        model.final_norm.bias.copy_(t(params["ln_f/b"]))
        for prefix, (lin, wname, j) in _linears(model).items():
            w, bias = params[f"{wname}/w"], params[f"{wname}/b"]
            if j is not None:
                w, bias = w[:, j * C:(j + 1) * C], bias[j * C:(j + 1) * C]
            lin.weight.copy_(t(w.T))
            lin.bias.copy_(t(bias))
    for p in model.parameters():
        p.requires_grad_(False)
    replace_linear_with_lora(model, rank, alpha)
    model.to(dtype)
    with torch.no_grad():
        for prefix, layer in lora_layers(model).items():
            layer.A.copy_(t(params[f"{prefix}/lora_A"]))
            layer.B.copy_(t(params[f"{prefix}/lora_B"]))
    return model


def lora_layers(model):
    """npgpt prefix -> the LoRALayer adapting it."""
    return {prefix: lin.lora for prefix, (lin, _, _) in _linears(model).items()}


def lora_params(model):
    """npgpt name (`<prefix>/lora_A|B`) -> torch Parameter."""
    out = {}
    for prefix, layer in lora_layers(model).items():
        out[f"{prefix}/lora_A"], out[f"{prefix}/lora_B"] = layer.A, layer.B
    return out


def loss_and_grads(model, ids, labels, lengths):
    """Mean cross-entropy, the LoRA gradients in npgpt naming, and the logits."""
    model.zero_grad(set_to_none=True)
    logits = model(torch.as_tensor(np.asarray(ids), dtype=torch.long), lengths)
    loss = F.cross_entropy(logits, torch.as_tensor(np.asarray(labels), dtype=torch.long))
    loss.backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in lora_params(model).items()}
    return float(loss.detach()), grads, logits.detach().numpy().copy()
