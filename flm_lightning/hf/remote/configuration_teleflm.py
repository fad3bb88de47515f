# Hugging Face configuration of Tele-FLM format models exported by the FLM Lightning trainer
# (`export-hf --format teleflm`). Self-contained: loaded with `trust_remote_code=True`.
# A Llama configuration plus the μP keys of the Tele-FLM releases: with use_mup, the token
# embeddings are multiplied by input_mult and the logits by output_mult / mup_scale_factor.
from transformers import LlamaConfig


class TeleFLMConfig(LlamaConfig):
    model_type = "TeleFLM"

    def __init__(self, use_mup=False, input_mult=1.0, output_mult=1.0, mup_scale_factor=1.0, **kwargs):
        self.use_mup = use_mup
        self.input_mult = input_mult
        self.output_mult = output_mult
        self.mup_scale_factor = mup_scale_factor
        super().__init__(**kwargs)
