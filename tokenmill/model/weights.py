"""Build a model on the meta device and fill it from a ModelSource, with a progress bar."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from tokenmill.errors import ModelLoadError
from tokenmill.kernels import quant_matmul
from tokenmill.layers.linear import QuantizationMethod, fbgemm_available
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import ModelSource


def load_model(
    cls: type[LlamaForCausalLM],
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    quantization: QuantizationMethod | None = None,
) -> LlamaForCausalLM:
    if quantization is not None:
        _check_quantization(quantization, device, dtype)
    with torch.device("meta"):
        model = cls(source.hf_config)
    model.to_empty(device=device)
    model.to(dtype)
    model.load_weights(_converted(source, device, dtype))
    model.rotary.build(device)
    model.prepare_for_decode(quantization, source.read_blocks)
    return model.eval()


def _converted(
    source: ModelSource, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    weights = tqdm(
        source.iter_weights(),
        total=source.num_weights,
        desc="Loading weights",
        unit="tensor",
        leave=False,
    )
    for name, tensor in weights:
        yield name, tensor.to(device=device, dtype=dtype)


def _check_quantization(
    quantization: QuantizationMethod, device: torch.device, dtype: torch.dtype
) -> None:
    if device.type != "cpu" or dtype != torch.float32:
        raise ModelLoadError(
            f"quantization {quantization!r} runs on CPU in float32 only "
            f"(got device {device.type}, dtype {str(dtype).removeprefix('torch.')})"
        )
    if quantization in ("gguf", "gguf-float32"):
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
