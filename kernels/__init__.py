"""Numba kernels on flat numpy arrays (installed as ``p2pdl.kernels``).

The lowest layer of p2pdl: it knows flat contiguous numpy buffers (float32/float64 for the
arithmetic and optimizers, uint16 words for bf16/fp16, every dtype torch.distributed reduces for
:func:`reduce_into`) and nothing of sockets, asyncio or torch.  Every public function validates
its arguments (``TypeError`` / ``ValueError``), accepts any C-contiguous array (flattened as a
view), works in place, and releases the GIL while it runs.  Large buffers go to multi-threaded
kernels: see :func:`set_parallel_threshold` and each function's ``parallel`` keyword.  Kernels
compile on first use (cached on disk); :func:`precompile` compiles them all up front.
"""

from ._jit import parallel_threshold, precompile, set_parallel_threshold
from .arith import add_, add_copy_, axpy_, scale_, sum_into
from .compress import (
    decode_add_bf16,
    decode_add_encode_round_bf16,
    decode_add_fp16,
    decode_bf16,
    decode_fp16,
    encode_bf16,
    encode_fp16,
    encode_round_bf16,
    scale_bf16,
)
from .fence import full_fence
from .optim import adam_step, sgd_step
from .quant import dequantize_int8, quantize_int8
from .reduce import reduce_into, reduce_into_bf16
from .slicing import slice_bounds

__all__ = [
    "adam_step",
    "add_",
    "add_copy_",
    "axpy_",
    "decode_add_bf16",
    "decode_add_encode_round_bf16",
    "decode_add_fp16",
    "decode_bf16",
    "decode_fp16",
    "dequantize_int8",
    "encode_bf16",
    "encode_fp16",
    "encode_round_bf16",
    "full_fence",
    "parallel_threshold",
    "precompile",
    "quantize_int8",
    "reduce_into",
    "reduce_into_bf16",
    "scale_",
    "scale_bf16",
    "set_parallel_threshold",
    "sgd_step",
    "slice_bounds",
    "sum_into",
]
