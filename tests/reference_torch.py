"""GPT-2 in PyTorch, used only by the tests as an independent reference for npgpt.

Written from the GPT-2 definition alone, with standard PyTorch modules and autograd, so that a
mistake in npgpt's hand-written forward or backward shows up as a disagreement:

    x = wte[ids] + wpe[0:T]                                    # [B,T,C]
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))   (pre-LN)
    x = ln_f(x)
    LM logits    = x @ wte^T                                   # [B,T,V]  (tied head)
    class logits = x[b, pos_b] @ cls/w + cls/b                 # [B,num_classes]

    attn(x): q, k, v = split(x @ c_attn/w + c_attn/b, 3)  (q, k, v order), heads of C/H,
             softmax(q k^T / sqrt(C/H) with -inf above the diagonal) v, then c_proj
    mlp(x):  gelu_tanh(x @ c_fc/w + c_fc/b) @ c_proj/w + c_proj/b
    LayerNorm eps 1e-5; no dropout.

Parameter names follow npgpt (OpenAI's checkpoint names). npgpt stores linear weights as [in,out]
for `x @ w + b`; nn.Linear stores [out,in] for `x @ W^T + b`, so weights are transposed on the way
in (`load_from_npgpt`) and their gradients on the way out (`grads_to_npgpt`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PAD_ID = 50256
POOLINGS = ("last_token", "last_position")


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=-1)                  # 3 x [B,T,C]
        q = q.view(B, T, H, D).transpose(1, 2)                     # [B,H,T,D]
        k = k.view(B, T, H, D).transpose(1, 2)                     # [B,H,T,D]
        v = v.view(B, T, H, D).transpose(1, 2)                     # [B,H,T,D]
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # [B,H,T,T]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        att = torch.softmax(scores, dim=-1)                        # [B,H,T,T]
        y = att @ v                                                # [B,H,T,D]
        y = y.transpose(1, 2).reshape(B, T, C)                     # [B,T,C]
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class TorchGPT2(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, vocab_size: int, n_ctx: int,
                 num_classes: int | None = None):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_ctx, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.cls = nn.Linear(n_embd, num_classes) if num_classes else None

    def hidden(self, ids):
        """ids [B,T] (int64) -> final-LayerNorm output [B,T,C]."""
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        x = self.wte(ids) + self.wpe(pos)                          # [B,T,C]
        for block in self.h:
            x = block(x)
        return self.ln_f(x)                                        # [B,T,C]

    def forward_lm(self, ids):
        """LM logits [B,T,V], head tied to wte."""
        return self.hidden(ids) @ self.wte.weight.t()              # [B,T,V]

    def forward_cls(self, ids, lengths=None, pooling="last_token"):
        """Class logits [B,num_classes] read at index lengths-1 ('last_token', lengths derived
        from the pad id when None) or at index T-1 ('last_position')."""
        if self.cls is None:
            raise ValueError("model has no classification head")
        x = self.hidden(ids)                                       # [B,T,C]
        B, T, _ = x.shape
        if pooling == "last_token":
            if lengths is None:
                lengths = lengths_from_pad(ids)
            idx = torch.as_tensor(np.asarray(lengths), dtype=torch.long) - 1   # [B]
        elif pooling == "last_position":
            idx = torch.full((B,), T - 1, dtype=torch.long)        # [B]
        else:
            raise ValueError(f"unknown pooling {pooling!r}")
        pooled = x[torch.arange(B), idx]                           # [B,C]
        return self.cls(pooled)                                    # [B,num_classes]


def lengths_from_pad(ids, pad_id: int = PAD_ID):
    """Right padding: the length of a row is the index of its first pad id (T if none)."""
    ids = np.asarray(ids)
    is_pad = ids == pad_id                                         # [B,T]
    return np.where(is_pad.any(axis=1), is_pad.argmax(axis=1), ids.shape[1])


# ----------------------------------------------------------------------------- npgpt <-> torch

def _linear_names(prefix: str):
    return (f"{prefix}/w", f"{prefix}/b")


def _name_map(model: TorchGPT2):
    """npgpt name -> (torch tensor, transpose?) for every parameter of the model."""
    m = {"wte": (model.wte.weight, False), "wpe": (model.wpe.weight, False)}
    for i, blk in enumerate(model.h):
        for ln_name, ln in (("ln_1", blk.ln_1), ("ln_2", blk.ln_2)):
            m[f"h{i}/{ln_name}/g"] = (ln.weight, False)
            m[f"h{i}/{ln_name}/b"] = (ln.bias, False)
        for lin_name, lin in (("attn/c_attn", blk.attn.c_attn), ("attn/c_proj", blk.attn.c_proj),
                              ("mlp/c_fc", blk.mlp.c_fc), ("mlp/c_proj", blk.mlp.c_proj)):
            w, b = _linear_names(f"h{i}/{lin_name}")
            m[w] = (lin.weight, True)
            m[b] = (lin.bias, False)
    m["ln_f/g"] = (model.ln_f.weight, False)
    m["ln_f/b"] = (model.ln_f.bias, False)
    if model.cls is not None:
        m["cls/w"] = (model.cls.weight, True)
        m["cls/b"] = (model.cls.bias, False)
    return m


def load_from_npgpt(params: dict, config, dtype=torch.float32, trainable_names=None) -> TorchGPT2:
    """Build a TorchGPT2 holding a copy of an npgpt parameter dict, in float32 or float64.

    `config` has n_layer, n_head, n_embd, vocab_size, n_ctx. Linear weights [in,out] are
    transposed into nn.Linear's [out,in]. When `trainable_names` is given, only those parameters
    require a gradient; otherwise all do."""
    num_classes = params["cls/b"].shape[0] if "cls/b" in params else None
    model = TorchGPT2(config.n_layer, config.n_head, config.n_embd, config.vocab_size,
                      config.n_ctx, num_classes)
    model.to(dtype)
    names = _name_map(model)
    if set(names) != set(params):
        raise ValueError(f"parameter names differ: missing {sorted(set(names) - set(params))[:3]}, "
                         f"extra {sorted(set(params) - set(names))[:3]}")
    keep = set(names) if trainable_names is None else set(trainable_names)
    with torch.no_grad():
        for name, (tensor, transpose) in names.items():
            arr = np.asarray(params[name])
            src = torch.from_numpy(arr.T if transpose else arr)
            if tuple(src.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: shape {tuple(arr.shape)} does not fit {tuple(tensor.shape)}")
            tensor.copy_(src)                                      # copies and casts
            tensor.requires_grad_(name in keep)
    return model


def params_to_npgpt(model: TorchGPT2) -> dict:
    """The model's parameters as numpy arrays in npgpt naming and orientation."""
    out = {}
    for name, (tensor, transpose) in _name_map(model).items():
        t = tensor.detach()
        out[name] = (t.t() if transpose else t).contiguous().numpy().copy()
    return out


def grads_to_npgpt(model: TorchGPT2) -> dict:
    """The `.grad` of every parameter that has one, as numpy arrays in npgpt naming and
    orientation (linear weight grads transposed back to [in,out])."""
    out = {}
    for name, (tensor, transpose) in _name_map(model).items():
        if tensor.grad is None:
            continue
        g = tensor.grad.detach()
        out[name] = (g.t() if transpose else g).contiguous().numpy().copy()
    return out


def named_torch_params(model: TorchGPT2) -> dict:
    """npgpt name -> the torch Parameter itself (for building optimizers and param groups)."""
    return {name: tensor for name, (tensor, _) in _name_map(model).items()}


def loss_and_grads(model: TorchGPT2, ids, labels, lengths=None, pooling="last_token", class_weights=None):
    """Mean cross-entropy of the class logits (weighted by class with class_weights [K], as
    F.cross_entropy(weight=) defines it), its gradients in npgpt naming, and the logits.

    Gradients are computed for the parameters that require one; earlier .grad values are cleared."""
    model.zero_grad(set_to_none=True)
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    logits = model.forward_cls(ids_t, lengths=lengths, pooling=pooling)   # [B,num_classes]
    weight = None if class_weights is None else torch.as_tensor(np.asarray(class_weights), dtype=logits.dtype)
    loss = F.cross_entropy(logits, labels_t, weight=weight)   # mean over the batch (weighted)
    loss.backward()
    return float(loss.detach()), grads_to_npgpt(model), logits.detach().numpy().copy()
