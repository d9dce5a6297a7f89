"""Qwen3: the Llama architecture with RMSNorm on each head of q and k before rotary."""

from tokenmill.model.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
