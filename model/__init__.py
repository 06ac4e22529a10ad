"""posleak's decoder: `from model import ModelConfig, Decoder`."""

from model.config import ConfigError, ModelConfig
from model.decoder import Decoder

__all__ = ["ConfigError", "Decoder", "ModelConfig"]
