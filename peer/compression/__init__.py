"""Tensor compressors and their wire codecs, in a registry by name (pure: no grpc, no crossgrad.v1).

    make("topk:0.01").compress(x, seed=s) -> Compressed (codec, shape, dtype, params, payload)
    make("topk:0.01").decompress(c)       -> tensor, checked against this configuration
    decode(c)                             -> tensor, from the record alone (any codec)
    ErrorFeedback("sign").compress(link, index, x, seed=s): c = C(e + x); e <- e + x - D(c)

Compressors (ALGORITHMS.md "Compressors"): none, fp16, bf16, topk:K, randk:K, qsgd:S, sign. Each
owns one codec of the same name (CODECS); the transport maps codec names to its proto enum and
carries `params` as codec parameters and `payload` as the tensor's bytes.
"""

from peer.compression import dense, quantized, sparse  # noqa: F401  (register the compressors)
from peer.compression.base import (
    CODECS,
    COMPRESSORS,
    Compressed,
    Compressor,
    decode,
    forms,
    make,
)
from peer.compression.feedback import ErrorFeedback

COMPRESSOR_NAMES: tuple[str, ...] = tuple(sorted(COMPRESSORS))
COMPRESSOR_FORMS: tuple[str, ...] = tuple(forms())

__all__ = [
    "CODECS",
    "COMPRESSORS",
    "COMPRESSOR_FORMS",
    "COMPRESSOR_NAMES",
    "Compressed",
    "Compressor",
    "ErrorFeedback",
    "decode",
    "make",
]
