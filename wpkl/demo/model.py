"""Tiny causal transformers (teacher and student) and their sampler.

``TinyLM`` has learned absolute position embeddings (the HMM task). ``RelativeLM`` has none: every attention
head adds a learned bias per relative distance (query position minus key position) to its scores, so what
the model learns at one position applies at every other (the running-sum task, where the digit to add is
always the same distance back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x, attn_bias=None):
        """``attn_bias``: None (causal attention) or a float [heads, T, T] bias that already holds the causal mask."""
        B, T, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if attn_bias is None:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.unsqueeze(0))
        x = x + self.proj(attn.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))


class _Sampler:
    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, new_tokens: int, generator: torch.Generator | None = None,
                 temperature: float = 1.0, allowed: int | None = None, greedy: bool = False) -> torch.Tensor:
        """Continue [B, P] prompts by ``new_tokens`` tokens: [B, P + new_tokens].

        ``allowed``: sample only among the first ``allowed`` tokens of the vocabulary. ``greedy``: argmax.
        """
        seq = prompts
        for _ in range(new_tokens):
            logits = self(seq)[:, -1].float()
            if allowed is not None:
                logits = logits[:, :allowed]
            if greedy:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = torch.multinomial(probs.cpu(), 1, generator=generator).to(seq.device)
            seq = torch.cat([seq, next_token], dim=1)
        return seq


class TinyLM(_Sampler, nn.Module):
    def __init__(self, vocab: int, d_model: int = 64, layers: int = 2, heads: int = 4, max_length: int = 64):
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(max_length, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] tokens -> [B, T, V] next-token logits."""
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class RelativeLM(_Sampler, nn.Module):
    """A causal transformer without absolute positions: each layer's heads add a learned bias b[h, i - j] to the
    score of query i for key j (distances beyond ``max_distance`` share the last bias)."""

    def __init__(self, vocab: int, d_model: int = 64, layers: int = 2, heads: int = 4, max_distance: int = 80):
        super().__init__()
        self.token = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.distance_bias = nn.Parameter(torch.zeros(layers, heads, max_distance))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.max_distance = max_distance

    def _bias(self, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[heads, Q, K] attention bias of query positions ``queries`` on key positions ``keys`` (causal)."""
        distance = queries[:, None] - keys[None, :]
        causal = torch.zeros(distance.shape, device=distance.device).masked_fill(distance < 0, float("-inf"))
        return self.distance_bias[layer][:, distance.clamp(0, self.max_distance - 1)] + causal

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] tokens -> [B, T, V] next-token logits."""
        position = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token(tokens)
        for layer, block in enumerate(self.blocks):
            x = block(x, self._bias(layer, position, position))
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompts: torch.Tensor, new_tokens: int, generator: torch.Generator | None = None,
                 temperature: float = 1.0, allowed: int | None = None, greedy: bool = False) -> torch.Tensor:
        """As ``_Sampler.generate``, with cached keys and values: each new token costs one position's work."""
        B, P = prompts.shape
        device = prompts.device
        position = torch.arange(P + new_tokens, device=device)
        cache = []  # per layer: keys, values [B, heads, t, head_dim]
        x = self.token(prompts)
        for layer, block in enumerate(self.blocks):
            x, kv = _block_step(block, x, self._bias(layer, position[:P], position[:P]), None)
            cache.append(kv)
        seq = prompts
        for t in range(P, P + new_tokens):
            logits = self.head(self.norm(x[:, -1])).float()
            if allowed is not None:
                logits = logits[:, :allowed]
            if greedy:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
            seq = torch.cat([seq, next_token], dim=1)
            if t == P + new_tokens - 1:
                break
            x = self.token(next_token)
            for layer, block in enumerate(self.blocks):
                x, cache[layer] = _block_step(block, x, self._bias(layer, position[t:t + 1], position[:t + 1]),
                                              cache[layer])
        return seq


def _block_step(block: Block, x: torch.Tensor, bias: torch.Tensor, cache):
    """``block`` on new positions x [B, n, D] given cached keys and values of earlier ones (or None)."""
    B, n, D = x.shape
    q, k, v = block.qkv(block.norm1(x)).view(B, n, 3, block.heads, D // block.heads).permute(2, 0, 3, 1, 4)
    if cache is not None:
        k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
    x = x + block.proj(attn.transpose(1, 2).reshape(B, n, D))
    return x + block.mlp(block.norm2(x)), (k, v)
