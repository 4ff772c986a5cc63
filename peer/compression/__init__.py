"""Tensor compressors and their wire codecs, in a registry by name (pure: no grpc, no crossgrad.v1).

    make("topk:0.01").compress(x, seed=s) -> Compressed (codec, shape, dtype, params, payload)
    make("topk:0.01").decompress(c)       -> tensor, checked against this configuration
    decode(c)                             -> tensor, from the record alone (any codec)
    ErrorFeedback("sign").compress(link, index, x, seed=s): c = C(e + x); e <- e + x - D(c)

Compressors (docs/algorithms.md, "Compressors"): none, fp16, bf16, topk:K, randk:K, qsgd:S, sign.
Each owns one codec of the same name (CODECS); the transport maps codec names to its proto enum and
carries `params` as codec parameters and `payload` as the tensor's bytes. The records, for d
elements of the original dtype (bit streams: bits.py; every field little-endian):

    codec  params                  payload
    none   -                       d elements of the dtype
    fp16   -                       d float16 (clamped to +-65504)
    bf16   -                       d bfloat16
    topk   k, index_coding         k values of the dtype, then the k indices: a d-bit bitmap
                                   (index_coding 0) or k LEB128 gaps (1), whichever is smaller
    randk  k, seed (< 2**53)       k values of the dtype; the indices come from the seed
    qsgd   s, norm                 d fields of b + 1 bits, b = bit length of s: level | sign << b
    sign   scale                   d bits, 1 = negative
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
