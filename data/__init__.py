"""posleak's data: position-free synthetic corpora, real text, a byte tokenizer, batch streams."""

from posleak.data.batches import BatchStream, DataConfig, make_source, vocab_size_of
from posleak.data.tokenizer import ByteTokenizer

__all__ = ["BatchStream", "ByteTokenizer", "DataConfig", "make_source", "vocab_size_of"]
