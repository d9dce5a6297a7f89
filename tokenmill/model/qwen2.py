"""Qwen2: the Llama architecture with biases on the q/k/v projections."""

from tokenmill.model.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_bias = True
    o_proj_bias = False
