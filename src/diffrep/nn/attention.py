"""One attention function, three backends, and the two attention modules built on it.

`attention(q, k, v, backend)` takes (B, heads, N, head_dim) tensors. Backends:
  math      softmax(q k^T / sqrt(d)) v, the reference (softmax in fp32)
  sdpa      torch.nn.functional.scaled_dot_product_attention
  xformers  xformers.ops.memory_efficient_attention (CUDA only; optional `gpu` extra)
  auto      xformers when importable and the tensors are on CUDA, else sdpa
Every module that attends carries an `attn_backend` string (default "auto");
`set_attention_backend(model, name)` sets it everywhere, so a config switch
reaches the UNet, the ViT (nn/vit.py reuses `MultiHeadSelfAttention`) and
anything else built on these modules.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("auto", "xformers", "sdpa", "math")
_XFORMERS_HINT = "install the `gpu` extra on a CUDA machine: `pip install --no-deps xformers` (it pins its own torch build)"
_xformers_ok: bool | None = None  # import check, cached: a failed import is slow to repeat


def xformers_available() -> bool:
    global _xformers_ok
    if _xformers_ok is None:
        try:
            import xformers.ops  # noqa: F401
            _xformers_ok = True
        except Exception:  # ImportError, or a build compiled against another torch
            _xformers_ok = False
    return _xformers_ok


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that `attention` will use for tensors on `device`."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {BACKENDS}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "xformers" if on_cuda and xformers_available() else "sdpa"
    if name == "xformers":
        if not on_cuda:
            raise RuntimeError(f"attention backend 'xformers' needs CUDA tensors (got device {device}); "
                               "use 'auto', 'sdpa' or 'math' on CPU")
        if not xformers_available():
            raise RuntimeError(f"attention backend 'xformers' requested but xformers is not importable; {_XFORMERS_HINT}, "
                               "or use 'auto'/'sdpa'")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Scaled dot-product attention; q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention expects q (B, H, N, D) and k, v (B, H, M, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    backend = resolve_backend(backend, q.device)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, N, M)
        return (scores.softmax(dim=-1) @ v.float()).to(v.dtype)
    import xformers.ops as xops

    # xformers wants (B, N, H, D) with a unit-stride last dim; the modules below already give that view
    q, k, v = (t.transpose(1, 2) if t.stride(-1) == 1 else t.transpose(1, 2).contiguous() for t in (q, k, v))
    return xops.memory_efficient_attention(q, k, v).transpose(1, 2)


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3C) -> q, k, v each (B, heads, N, C // heads), as views."""
    B, N, C3 = qkv.shape
    return qkv.reshape(B, N, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, D) -> (B, N, heads * D)."""
    B, H, N, D = out.shape
    return out.transpose(1, 2).reshape(B, N, H * D)


def _check_heads(channels: int, heads: int, where: str) -> None:
    if heads < 1 or channels % heads:
        raise ValueError(f"{where}: heads={heads} must divide the channel count {channels}")


class SelfAttention2d(nn.Module):
    """Residual self-attention over the pixels of a feature map (B, C, H, W); identity at init."""

    def __init__(self, channels: int, heads: int = 1, groups: int = 8):
        super().__init__()
        _check_heads(channels, heads, "SelfAttention2d")
        self.heads, self.attn_backend = heads, "auto"
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)  # a new attention block starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        # pixels as tokens (B, HW, 3C): free under channels_last, one copy otherwise,
        # so every backend gets a unit-stride head dim (what the fused CUDA kernels need)
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()
        out = merge_heads(attention(*split_heads(qkv, self.heads), self.attn_backend))  # (B, HW, C)
        return x + self.proj(out.transpose(1, 2).reshape(B, C, H, W))


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over tokens (B, N, C) -> (B, N, C); no residual, no norm (the caller's block owns those)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        _check_heads(dim, heads, "MultiHeadSelfAttention")
        self.heads, self.attn_backend = heads, "auto"
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = split_heads(self.qkv(x), self.heads)  # each (B, heads, N, head_dim)
        return self.proj(merge_heads(attention(q, k, v, self.attn_backend)))


def set_attention_backend(model: nn.Module, name: str) -> int:
    """Set `attn_backend` on every submodule that has one; returns how many were set."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {BACKENDS}")
    n = 0
    for m in model.modules():
        if hasattr(m, "attn_backend"):
            m.attn_backend = name
            n += 1
    return n
