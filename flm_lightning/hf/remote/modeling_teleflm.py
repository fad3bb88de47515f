# Hugging Face model of the Tele-FLM format, exported by `python -m flm_lightning export-hf
# --format teleflm`. Self-contained: loaded with `trust_remote_code=True`. Llama's network with the
# μP multipliers of the Tele-FLM releases applied, not folded into the weights: with use_mup the
# token embeddings are multiplied by input_mult and the logits by output_mult / mup_scale_factor
# (the computation vLLM's TeleFLM model does on top of its Llama model). inputs_embeds passed by
# the caller are taken as they are (already multiplied).

from transformers import LlamaForCausalLM

from .configuration_teleflm import TeleFLMConfig


class TeleFLMForCausalLM(LlamaForCausalLM):
    config_class = TeleFLMConfig

    def forward(self, input_ids=None, inputs_embeds=None, labels=None, **kwargs):
        mup = self.config.use_mup
        if mup and inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.get_input_embeddings()(input_ids) * self.config.input_mult
            input_ids = None
        out = super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if mup:
            out.logits = out.logits * (self.config.output_mult / self.config.mup_scale_factor)
        if labels is not None:
            out.loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=self.config.vocab_size)
        return out
