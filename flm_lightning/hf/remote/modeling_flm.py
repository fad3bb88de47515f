# Hugging Face model of the FLM family (FLM-101B style: LayerNorm, GeLU, biases, xPos, tied
# embedding/head, plus every other combination the FLM Lightning trainer supports), exported by
# `python -m flm_lightning export-hf`. Self-contained: loaded with `trust_remote_code=True`.
# Parameter names equal the trainer's, so the export is a plain copy of its weights.

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_flm import FLMConfig

# xPos factors stay within e^(+-XPOS_MAX_LOG_SCALE); fp32 ends at e^88.7 (the rest is headroom for q and k).
XPOS_MAX_LOG_SCALE = 80.0


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rotary_tables(config, position_ids):
    """cos and sin for [B, T] positions, fp32, shaped [B, 1, T, D]."""
    d = config.head_dim
    pair = torch.arange(d // 2, dtype=torch.float64, device=position_ids.device)
    angles = position_ids.to(torch.float64)[..., None] * (config.rope_theta ** (-2.0 * pair / d))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float()[:, None], angles.sin().float()[:, None]


def _xpos_scales(config, query_positions, key_positions):
    """xPos factors of the queries ([B, 1, T, D]) and keys ([B, 1, K, D]), fp32.

    Pair j has zeta_j = (2j/D + 0.4) / 1.4; a query at n gets zeta^((n-c)/B), a key at m gets
    zeta^(-(m-c)/B), so a score carries zeta^((n-m)/B) whatever c is. Here c is the middle of the
    positions this call attends (not a fixed position), and the factors are exp(log) in fp64: they
    depend on the span of the call, never on how far the positions are from 0, so generating far
    past the training length stays finite. A span too long for fp32 raises ValueError.
    """
    d = config.head_dim
    pair = torch.arange(d // 2, dtype=torch.float64, device=query_positions.device)
    log_zeta = torch.log((2.0 * pair / d + 0.4) / 1.4) / config.xpos_scale_base
    qp, kp = query_positions.to(torch.float64), key_positions.to(torch.float64)
    lo, hi = kp.min(-1, keepdim=True).values, qp.max(-1, keepdim=True).values
    centre = torch.floor((lo + hi) / 2)
    widest = float(torch.maximum(hi - centre, centre - lo).max()) * float(-log_zeta[0])
    if widest > XPOS_MAX_LOG_SCALE:
        longest = int(2 * XPOS_MAX_LOG_SCALE / float(-log_zeta[0]))
        raise ValueError(
            f"xPos: this call attends over {int((hi - lo).max()) + 1} positions, more than fp32 can "
            f"scale at xpos_scale_base {config.xpos_scale_base} (at most about {longest})"
        )
    q_scale = torch.exp((qp - centre)[..., None] * log_zeta)
    k_scale = torch.exp(-(kp - centre)[..., None] * log_zeta)
    q_scale, k_scale = (torch.cat([x, x], dim=-1).float()[:, None] for x in (q_scale, k_scale))
    return q_scale, k_scale


def _norm(config):
    if config.norm == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class FLMAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        inner = config.num_attention_heads * config.head_dim
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.hidden_size, inner, bias=config.bias)
        self.wk = nn.Linear(config.hidden_size, inner, bias=config.bias)
        self.wv = nn.Linear(config.hidden_size, inner, bias=config.bias)
        self.wo = nn.Linear(inner, config.hidden_size, bias=config.bias)

    def forward(self, x, tables, mask, cache):
        bsz, seq, _ = x.shape
        q = self.wq(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin, scales = tables
        qf, kf = q.float(), k.float()
        qf = qf * cos + _rotate_half(qf) * sin
        kf = kf * cos + _rotate_half(kf) * sin
        if scales is not None:
            qf = qf * scales[0]
        q, k = qf.to(q.dtype), kf.to(k.dtype)
        if cache is not None:  # keys are cached rotated but not xPos-scaled: the scale depends on the call
            k, v = cache.update(k, v, self.layer_idx)
        if scales is not None:
            k = (k.float() * scales[1]).to(v.dtype)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=seq > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FLMMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.swiglu = config.activation == "swiglu"
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        if self.swiglu:
            self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)

    def forward(self, x):
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class FLMBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention_norm = _norm(config)
        self.attention = FLMAttention(config, layer_idx)
        self.ffn_norm = _norm(config)
        self.feed_forward = FLMMLP(config)

    def forward(self, x, tables, mask, cache):
        h = x + self.attention(self.attention_norm(x), tables, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class FLMPreTrainedModel(PreTrainedModel):
    config_class = FLMConfig
    base_model_prefix = "flm"
    _no_split_modules = ["FLMBlock"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class FLMForCausalLM(FLMPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([FLMBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = _norm(config)
        self.output = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def _mask(self, attention_mask, n_queries, n_keys, device):
        """Boolean [B, 1, Q, K] mask: causal with an offset for cached keys, minus padding."""
        if attention_mask is None or bool(attention_mask.all()):
            if n_queries == n_keys or n_queries == 1:
                return None
        q = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)
        mask = (torch.arange(n_keys, device=device)[None, :] <= q)[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -n_keys:].bool()
        return mask

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        cache=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        h = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.config.input_mult != 1.0:
            h = h * self.config.input_mult
        past = cache.get_seq_length() if cache is not None else 0
        seq = h.shape[1]
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                position_ids = torch.arange(past, past + seq, device=h.device)[None]
        cos, sin = _rotary_tables(self.config, position_ids)
        scales = None
        if self.config.position == "xpos":
            if past == 0:
                key_positions = position_ids
            elif attention_mask is not None and attention_mask.shape[-1] == past + seq:
                key_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:  # contiguous positions before the new ones
                key_positions = position_ids[:, :1] - past + torch.arange(past + seq, device=h.device)
            scales = _xpos_scales(self.config, position_ids, key_positions)
        tables = (cos, sin, scales)
        mask = self._mask(attention_mask, seq, past + seq, h.device)
        for layer in self.layers:
            h = layer(h, tables, mask, cache)
        h = self.norm(h)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits = F.linear(h, weight)
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        fields = CausalLMOutputWithPast.__dataclass_fields__
        cache_field = "past_key_values" if "past_key_values" in fields else "cache"
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{cache_field: cache})
