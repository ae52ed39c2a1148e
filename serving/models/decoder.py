"""Llama / Qwen2 / Qwen3 dense decoders, run layer by layer.

Parameter names are Hugging Face's (`model.layers.3.self_attn.q_proj.weight`, ...) so checkpoints
load by name and an RL trainer pushes weights by name. Two forward paths share the weights:
  * `forward(input_ids)`: dense causal attention over a padded batch (training, references);
  * `forward_paged(...)`: packed tokens over the engine's paged KV cache, for layers [start, end)
    only when asked (pipeline stages and per-layer recompute need that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rollout_accel.kernels.fused_ops import add_rms_norm, qk_norm_rope, rms_norm, silu_and_mul
from rollout_accel.serving.models.config import ModelConfig
from rollout_accel.serving.models.paged_kv import AttentionMetadata, PagedKVCache, paged_attention


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Hugging Face does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables by position, grown on demand; not a parameter (never pushed by name)."""

    def __init__(self, head_dim: int, theta: float, initial_positions: int = 4096) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._initial = initial_positions
        self.generation = 0  # bumped at every reallocation (CUDA graphs check it)

    def _grow(self, needed: int, device: torch.device) -> None:
        size = max(needed, self._initial, 2 * (0 if self._cos is None else self._cos.shape[0]))
        positions = torch.arange(size, device=device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = emb.cos(), emb.sin()
        self.generation += 1

    def tables(self, max_position: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The tables, covering `max_position`, on `device`. They are reallocated only when too
        short or on another device: a captured CUDA graph holds their address, so a needless
        reallocation (say "cuda" vs "cuda:0") would leave it reading freed memory."""
        if (
            self._cos is None
            or self._cos.shape[0] <= max_position
            or not _same_device(self._cos.device, torch.device(device))
        ):
            self._grow(max_position + 1, device)
        assert self._cos is not None and self._sin is not None
        return self._cos, self._sin

    def forward(
        self, positions: torch.Tensor, max_position: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `positions` (any shape) -> positions.shape + (head_dim,).

        Pass `max_position` when known to avoid reading it back from the device.
        """
        top = int(positions.max().item()) if max_position is None else max_position
        cos, sin = self.tables(top, positions.device)
        return cos[positions], sin[positions]


def _same_device(have: torch.device, want: torch.device) -> bool:
    """`want` without an index ("cuda") means the current device of its type."""
    if have.type != want.type:
        return False
    if want.index is None:
        return have.type != "cuda" or have.index == torch.cuda.current_device()
    return have.index == want.index


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., heads, dim]; cos/sin broadcast over heads."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        bias = config.attention_bias
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One [q; k; v] weight whose slices *are* q_proj/k_proj/v_proj's parameters (views), so
        the paged path runs one matmul while updates by name keep writing the same storage."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = torch.cat([p.weight for p in projs]).contiguous()
        offset = 0
        for proj in projs:
            rows = proj.weight.shape[0]
            proj.weight.data = self.qkv_weight[offset : offset + rows]
            offset += rows
        if self.q_proj.bias is not None:
            self.qkv_bias = torch.cat([p.bias for p in projs]).contiguous()
            offset = 0
            for proj in projs:
                rows = proj.bias.shape[0]
                proj.bias.data = self.qkv_bias[offset : offset + rows]
                offset += rows

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*shape, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward_dense(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, hidden], causal."""
        q, k, v = self._project(x, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).flatten(-2))

    def forward_paged(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        cache: PagedKVCache,
    ) -> torch.Tensor:
        """x: [total_q, hidden] packed tokens. q/k norm and rotary run as one fused op."""
        t = x.shape[0]
        if self.qkv_weight is not None:
            qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
            nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q = qkv[:, :nq].view(t, self.num_heads, self.head_dim)
            k = qkv[:, nq : nq + nk].view(t, self.num_kv_heads, self.head_dim)
            v = qkv[:, nq + nk :].view(t, self.num_kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qk_norm_rope(
                q, k, cos, sin, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps
            )
        else:
            q, k = qk_norm_rope(q, k, cos, sin)
        out = paged_attention(self.layer_idx, q, k, v, meta, cache, self.scale)
        return self.o_proj(out.flatten(-2))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate_up = F.linear(x, self.gate_up_weight)
            half = gate_up.shape[-1] // 2
            return self.down_proj(silu_and_mul(gate_up[..., :half], gate_up[..., half:]))
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """[gate; up] as one weight whose halves are the two parameters (views)."""
        self.gate_up_weight = torch.cat([self.gate_proj.weight, self.up_proj.weight]).contiguous()
        rows = self.gate_proj.weight.shape[0]
        self.gate_proj.weight.data = self.gate_up_weight[:rows]
        self.up_proj.weight.data = self.gate_up_weight[rows:]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward_dense(self, x, cos, sin) -> torch.Tensor:
        x = x + self.self_attn.forward_dense(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_paged(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        cache: PagedKVCache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual-stream form: returns (this layer's output, the running residual); their sum
        is the layer's hidden state. Each residual add is fused into the next RMSNorm."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual = hidden
            normed = rms_norm(hidden, norm1.weight, norm1.eps)
        else:
            normed, residual = add_rms_norm(hidden, residual, norm1.weight, norm1.eps)
        attn = self.self_attn.forward_paged(normed, cos, sin, meta, cache)
        normed, residual = add_rms_norm(attn, residual, norm2.weight, norm2.eps)
        return self.mlp.forward_fused(normed), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)


class CausalLM(nn.Module):
    """A dense decoder with an LM head; HF-named parameters, layer-range execution."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Fused qkv and gate_up weights for the paged (inference) path; call again after
        parameters were re-pointed (memory release/resume)."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def drop_fused_projections(self) -> None:
        """Forgets the fused weights (the paged path falls back to the separate projections).
        A memory release must call it: the fused tensors own the storage the parameters view,
        so offloading the parameters alone would keep every attention and MLP weight resident."""
        for layer in self.model.layers:
            layer.self_attn.qkv_weight = None
            layer.self_attn.qkv_bias = None
            layer.mlp.gate_up_weight = None

    def parameter_by_name(self, name: str) -> torch.Tensor:
        """The parameter a checkpoint or trainer calls `name` (tied lm_head included)."""
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        params = dict(self.named_parameters())
        if name not in params:
            raise KeyError(name)
        return params[name]

    # -- dense path -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, seq] (right-padded) -> logits [batch, seq, vocab]; causal."""
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device)
        cos, sin = self.model.rotary(positions, max_position=seq - 1)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer.forward_dense(x, cos, sin)
        return self.lm_head(self.model.norm(x))

    # -- paged path -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def _run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        cache: PagedKVCache,
        start: int,
        end: int | None,
        max_position: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cos, sin = self.model.rotary(positions, max_position=max_position)
        residual: torch.Tensor | None = None
        for layer in self.model.layers[start:end]:
            hidden, residual = layer.forward_paged(hidden, residual, cos, sin, meta, cache)
        return hidden, residual

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden)).float()

    def forward_paged(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        cache: PagedKVCache,
        logit_rows: torch.Tensor | None = None,
        max_position: int | None = None,
    ) -> torch.Tensor:
        """Packed tokens through every layer; logits only for `logit_rows` (e.g. last tokens).

        Logits come in the model's dtype (bf16 on GPUs: the sampler upcasts inside its kernel,
        which saves a [batch, vocab] float32 copy per step); callers upcast where they need to."""
        hidden, residual = self._run_layers(
            self.embed(input_ids), positions, meta, cache, 0, None, max_position
        )
        if logit_rows is not None:
            hidden = hidden[logit_rows]
            residual = None if residual is None else residual[logit_rows]
        norm = self.model.norm
        if residual is None:
            normed = rms_norm(hidden, norm.weight, norm.eps)
        else:
            normed, _ = add_rms_norm(hidden, residual, norm.weight, norm.eps)
        return self.lm_head(normed)
