"""The model's own vocabulary and chat template: text ↔ token ids, prompts from conversations."""

from cholla.tokenizer.chat_template import ChatTemplate, encode_chat
from cholla.tokenizer.detokenizer import IncrementalDetokenizer
from cholla.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "IncrementalDetokenizer", "Tokenizer", "encode_chat"]
