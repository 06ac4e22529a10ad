"""posleak's decoder: `from posleak.model import ModelConfig, Decoder`."""

from posleak.model.config import ConfigError, ModelConfig
from posleak.model.decoder import Decoder

__all__ = ["ConfigError", "Decoder", "ModelConfig"]
