"""Networks: attention backends, conditioning embeddings, the AdaGN UNet, the ResNet encoder.

The attention *function* is deliberately not re-exported here: a package attribute named
`attention` would shadow the submodule `diffrep.nn.attention`. Import it from there.
"""
from diffrep.nn.attention import (
    BACKENDS,
    MultiHeadSelfAttention,
    SelfAttention2d,
    resolve_backend,
    set_attention_backend,
    xformers_available,
)
from diffrep.nn.embeddings import LogSNREmbedding, VectorEmbedding, logsnr_to_unit, sinusoidal
from diffrep.nn.encoder import ResNetEncoder
from diffrep.nn.unet import UNet

__all__ = [
    "BACKENDS", "MultiHeadSelfAttention", "SelfAttention2d", "resolve_backend",
    "set_attention_backend", "xformers_available", "LogSNREmbedding", "VectorEmbedding", "logsnr_to_unit",
    "sinusoidal", "ResNetEncoder", "UNet",
]
