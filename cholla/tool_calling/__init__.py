"""Tool calling: the formats models write calls in, read back whole or as a stream.

``chooser.parser_class`` picks a format from the chat template; each format module
parses it; ``schemas`` builds the grammars that force ``tool_choice``; ``generic``
is the format for templates without tool support.
"""

from cholla.tool_calling.call import ToolCall, ToolCallDelta, new_call_id
from cholla.tool_calling.chooser import PARSERS, forced_parser, parser_class
from cholla.tool_calling.parser import ToolCallStream, ToolParser

__all__ = ["PARSERS", "ToolCall", "ToolCallDelta", "ToolCallStream", "ToolParser", "forced_parser", "new_call_id",
           "parser_class"]
