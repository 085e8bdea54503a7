"""The reward model's training-time building blocks, faster on CPU than torch's own for the same maths.

On CPU, torch's dropout draws its mask with bernoulli_, 2-3x slower than comparing a uniform draw (itself
3x slower than one random byte per element, which dropout() uses),
three of them act on every token of every pair in each encoder layer: ~20% of a training step of the
v-tf model on ML-100K. These keep torch's parameters (names
included, so checkpoints load either way) and its inference fast path; only training's forward is
rewritten. The masks are drawn from the same distribution, not the same stream as torch's.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def drop_threshold(p: float) -> int:
    """The drop probability in 256ths, as dropout() applies it: p rounded to the nearest 1/256."""
    return min(256, max(0, round(p * 256)))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout's maths (zero with probability p, scale the rest to keep the mean) with one random byte per
    element, 8 bytes per 64-bit draw: torch's CPU generator is serial, and a float per element (rand_like)
    cost 3x as much, ~14% of a u1 training step on 2 threads. So p is applied in 256ths (drop_threshold:
    0.3 is 77/256 = 0.3008; below 1/512 nothing is dropped) and the kept values are scaled by 256 / (256 - k)."""
    k = drop_threshold(p)
    if not training or k == 0:
        return x
    if k == 256:
        return x * 0.0
    n = x.numel()
    bits = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.uint8)[:n].view(x.shape) >= k
    return x * (keep.to(x.dtype) * (256.0 / (256 - k)))


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class EncoderLayer(nn.TransformerEncoderLayer):
    """nn.TransformerEncoderLayer (batch_first, norm_first, GELU) whose training forward is written out.

    Inference (eval or no grad) is torch's own forward, with its fused fast path."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or src_key_padding_mask is not None:
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        p = self.dropout.p
        # torch's own attention (fused; written out it was slower, bernoulli_ and all); the dropouts around it are ours.
        h = self.norm1(src)
        x = src + dropout(self.self_attn(h, h, h, attn_mask=src_mask, need_weights=False)[0], p, True)
        h = self.linear2(dropout(F.gelu(self.linear1(self.norm2(x))), p, True))
        return x + dropout(h, p, True)
