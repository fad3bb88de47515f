# Hugging Face configuration of FLM-family models exported by the FLM Lightning trainer.
# Self-contained: loaded with `trust_remote_code=True`, without the trainer installed.
from transformers import PretrainedConfig


class FLMConfig(PretrainedConfig):
    model_type = "flm"

    def __init__(
        self,
        vocab_size=100256,
        hidden_size=10240,
        num_hidden_layers=80,
        num_attention_heads=80,
        head_dim=128,
        intermediate_size=40960,
        norm="layernorm",
        norm_eps=1e-5,
        activation="gelu",
        bias=True,
        position="xpos",
        rope_theta=10000.0,
        xpos_scale_base=512.0,
        xpos_center=None,
        tie_embeddings=True,
        input_mult=1.0,
        logit_scale=1.0,
        max_position_embeddings=2048,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.norm = norm
        self.norm_eps = norm_eps
        self.activation = activation
        self.bias = bias
        self.position = position
        self.rope_theta = rope_theta
        self.xpos_scale_base = xpos_scale_base
        self.xpos_center = xpos_center  # read by older exports only: xPos is now centred on each call's positions
        self.tie_embeddings = tie_embeddings
        self.input_mult = input_mult
        self.logit_scale = logit_scale
        self.max_position_embeddings = max_position_embeddings
        # The head reuses the embedding matrix itself when tied; Hugging Face's tying is not needed.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
