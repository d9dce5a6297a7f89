"""Weight and KV cache formats: which one runs where, decided here and nowhere else.

Weight formats (`--quantization`; CPU, float32 math only):
- "gguf": a GGUF file's own quantized blocks (Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K;
  each tensor in its own type, a fused projection's parts in one format that holds them
  all), multiplied by the native kernel (kernels/quant_matmul.c) with activations
  quantized to int8 per 32-value block and integer dot products: llama.cpp's numerics,
  a third of float16's weight bytes, batch-invariant. The first decoder layer's linears
  keep float32 activations (`FLOAT_ACTIVATION_LAYERS`): measured, the most accuracy for
  the least time (docs/benchmarks.md, "Quality of the CPU paths"). Repacking at load is exact but for
  Q4_K/Q5_K's sub-block scales and mins, rounded to float16 (quant_matmul.py). Fused
  parts no one format holds (Q4_K q|k beside a Q6_K v) run as a SplitGGUFLinear, each
  run in its own format. A mixture's experts keep their blocks expert by expert, and the
  token embedding its blocks (rows decoded as looked up). A layer stored in another type
  is packed as "fp16" instead, named in one log line.
- "gguf-float32": the same blocks in float32 math (logits equal the dequantized model's up
  to summation order); slower than int8 activations.
- "rtn": vLLM's online round-to-nearest quantization of a float checkpoint: each linear's
  weights rounded at load to Q8_0 blocks (RTN_NUM_BITS=4: Q4_1; the output projection
  and the token embedding Q8_0), then run as "gguf" runs a file's blocks (rtn.py).
- "fp16": float16 weights, float32 activations and accumulation: the native kernel's
  panels where its vector tiles run, else fbgemm's fp16 GEMM. Half the bytes of float32
  weights; greedy output matched float32 in tests.
- "none": the dtype's own weights, exact.
Default (dtype auto on a CPU): "gguf" for a GGUF file where the vector tiles run, else
"fp16" where a fast float16 kernel runs, else none. A pinned dtype stays exact; GPUs run
the dtype's own weights. The measured speed of each is in docs/benchmarks.md ("Weight
formats").

KV cache (`--kv-cache-dtype`): "auto" is float16 on a CPU running "gguf" or "rtn"
(already approximate; llama.cpp's default cache type; half the bytes attention reads)
where the kernels read and write float16, else the model's dtype.
"""

from __future__ import annotations

from typing import get_args

import torch

from tokenmill.config import Quantization
from tokenmill.errors import ModelLoadError
from tokenmill.kernels import layer_ops, paged_attention, quant_matmul
from tokenmill.layers.linear import fbgemm_available

_FP16_MAX = 65504.0
# linears (by path prefix) that keep float32 activations under "gguf": the first layer's
# int8 rounding costs the most perplexity per matmul (docs/benchmarks.md, "Quality of the
# CPU paths")
FLOAT_ACTIVATION_LAYERS = ("model.layers.0.",)


def resolve_quantization(
    quantization: str | None, dtype: str, device: torch.device, file_format: str = "safetensors"
) -> Quantization | None:
    """The weight format: as asked, else the default above; None = the dtype's own."""
    if quantization == "none":
        return None
    if quantization in get_args(Quantization):
        return quantization  # type: ignore[return-value]
    if quantization is not None:
        choices = ", ".join(get_args(Quantization))
        raise ModelLoadError(f"unknown quantization {quantization!r}; use {choices} or none")
    if dtype != "auto" or device.type != "cpu":
        return None
    if file_format == "gguf" and quant_matmul.vectorized():
        return "gguf"
    return "fp16" if fast_fp16() else None


def check_quantization(
    quantization: Quantization, device: torch.device, dtype: torch.dtype
) -> None:
    """Raise ModelLoadError when `quantization` cannot run here."""
    if device.type != "cpu" or dtype != torch.float32:
        raise ModelLoadError(
            f"quantization {quantization!r} runs on CPU in float32 only "
            f"(got device {device.type}, dtype {str(dtype).removeprefix('torch.')})"
        )
    if quantization in ("gguf", "gguf-float32", "rtn"):
        if not quant_matmul.available():
            raise ModelLoadError(
                f"quantization {quantization!r} needs the native kernels (a C compiler; "
                "TOKENMILL_NATIVE_KERNELS not 0)"
            )
        return
    if not (fbgemm_available() or quant_matmul.available()):
        raise ModelLoadError(
            f"quantization {quantization!r} needs the native kernels (a C compiler) or "
            "PyTorch's fbgemm backend (x86 CPUs); neither is here"
        )


def fast_fp16() -> bool:
    """Whether a fast float16 matmul runs here: the native vector tiles, or fbgemm."""
    return quant_matmul.vectorized() or fbgemm_available()


def native_fp16_panels() -> bool:
    """Whether "fp16" weights go into the native kernel's panels (else fbgemm's layout)."""
    return quant_matmul.vectorized() or not fbgemm_available()


def fits_fp16(weight: torch.Tensor) -> bool:
    """Whether `weight` is within float16's range (a layer past it keeps its own weights)."""
    return bool(weight.detach().abs().max() <= _FP16_MAX)


# caches narrower than float32, by --kv-cache-dtype: bfloat16 (float32's range, 8
# significant bits: for keys or values past float16's 65504), and vLLM's names for 8-bit
# floats: fp8_e5m2 (5 exponent, 2 mantissa bits: a float16's top byte), fp8 and fp8_e4m3
# (4 and 3, no infinities, saturating at +-448; vLLM's default scale of 1: values stored
# as they are)
_NARROW_CACHES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8_e5m2": torch.float8_e5m2,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
}


def resolve_kv_cache_dtype(
    setting: str,
    model_dtype: torch.dtype,
    device: torch.device,
    quantization: Quantization | None,
    head_dim: int,
) -> torch.dtype:
    """The KV cache's element type: as asked, else the default above."""
    cpu_f16 = device.type != "cpu" or (
        layer_ops.writes_f16() and paged_attention.reads_f16(head_dim)
    )
    if setting == "float32":
        return torch.float32
    if setting in _NARROW_CACHES:
        if not cpu_f16:
            raise ModelLoadError(
                f"--kv-cache-dtype {setting} needs the native kernels' float16 loops (an x86 "
                "build with F16C) on this CPU; use float32"
            )
        return _NARROW_CACHES[setting]
    if setting != "auto":
        raise ModelLoadError(
            f"unknown kv_cache_dtype {setting!r}; use auto, float16, bfloat16, float32, fp8, "
            "fp8_e4m3 or fp8_e5m2"
        )
    if device.type == "cpu" and quantization in ("gguf", "rtn") and cpu_f16:
        return torch.float16
    return model_dtype
