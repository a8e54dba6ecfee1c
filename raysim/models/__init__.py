"""Small sensor models, their registry, and the flat parameter layout.

``model: {name: ...}`` in a scenario picks an entry of :data:`MODELS`. Every
model maps float32 ``(n, channels, window)`` to logits ``(n, classes)`` and
keeps all its state in parameters, so :class:`ParamLayout` turns it into one
flat float32 vector and back.
"""

from raysim.models.base import MODELS, build_model, init_weights
from raysim.models.dscnn import DSCNNConfig
from raysim.models.layout import ParamLayout
from raysim.models.mlp import MLPConfig

__all__ = ["MODELS", "DSCNNConfig", "MLPConfig", "ParamLayout", "build_model", "init_weights"]
