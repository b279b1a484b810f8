"""Render a conversation into the prompt text a chat model was trained on.

Chat templates are Jinja programs shipped with the model (GGUF ``tokenizer.chat_template``,
Hugging Face ``tokenizer_config.json``). We render them exactly as ``transformers``'
``apply_chat_template`` does: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``
and a ``tojson`` that keeps non-ASCII text as is.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, Collection

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cholla.errors import ChatTemplateError
from cholla.tool_calling.generic import generic_messages

if TYPE_CHECKING:
    from cholla.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("cholla")

Message = dict[str, Any]

# For a model with no template: ChatML, what transformers used by default before v4.43.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# For a vocabulary with Gemma's turn tokens: Gemma's own format (the system prompt joins the
# first user turn, "assistant" is called "model").
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _raise_exception(message: str):
    raise ChatTemplateError(f"the chat template refused these messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and ASCII-encodes; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _loops_over_content(ast: jinja2.nodes.Template) -> bool:
    """Whether the template iterates over a message's ``content`` (so it accepts a list of parts)."""
    for loop in ast.find_all(jinja2.nodes.For):
        for node in [loop.iter, *loop.iter.find_all((jinja2.nodes.Getitem, jinja2.nodes.Getattr))]:
            if isinstance(node, jinja2.nodes.Getattr) and node.attr == "content":
                return True
            if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content":
                return True
    return False


def _uses_variable(ast: jinja2.nodes.Template, name: str) -> bool:
    """Whether the template reads the variable ``name`` (``tools``: it renders tool definitions itself)."""
    return any(node.name == name for node in ast.find_all(jinja2.nodes.Name))


def _arguments_as_dicts(message: Message) -> Message:
    """An assistant message whose calls carry arguments as dicts, as HF templates expect (OpenAI sends JSON text)."""
    calls = []
    for call in message["tool_calls"]:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatTemplateError(f"a tool call must be {{'function': {{'name': ..., 'arguments': ...}}}}, got {call!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise ChatTemplateError(f"tool call {function['name']!r} has arguments that are not JSON: "
                                        f"{arguments[:80]!r}") from None
        calls.append({**call, "function": {**function, "arguments": arguments}})
    return {**message, "tool_calls": calls}


def _text_of(content: list) -> str:
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatTemplateError(f"message content part of type {kind!r} is not supported; send text parts only")
    return "\n".join(texts)


class ChatTemplate:
    """A compiled chat template. ``template=None`` selects a documented fallback (``is_fallback``).

    The fallback is Gemma's turn format when ``special_tokens`` holds ``<start_of_turn>`` and
    ``<end_of_turn>``, else ChatML. ``ChatTemplate.for_tokenizer(tokenizer)`` fills them in.
    """

    def __init__(
        self,
        template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens: Collection[str] = (),
    ):
        self.is_fallback = not template
        if self.is_fallback:
            gemma = "<start_of_turn>" in special_tokens and "<end_of_turn>" in special_tokens
            template = GEMMA_TEMPLATE if gemma else CHATML_TEMPLATE
            log.warning("the model has no chat template; using the %s fallback", "Gemma turn" if gemma else "ChatML")
        self.source = template
        self.bos_token, self.eos_token = bos_token, eos_token
        env = _environment()
        try:
            ast = env.parse(template)
            self._template = env.from_string(ast)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"the chat template has a syntax error at line {e.lineno}: {e.message}; fix the template or pass another one"
            ) from None
        # Templates that never loop over content expect a string: lists of text parts get joined.
        self.accepts_content_parts = _loops_over_content(ast)
        # Templates that never read ``tools`` get tools and tool history in the generic format.
        self.supports_tools = not self.is_fallback and _uses_variable(ast, "tools")

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The tokenizer's own template, or the fallback that suits its vocabulary."""
        return cls(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tokenizer.special_tokens)

    def _prepare(self, messages: list[Message]) -> list[Message]:
        prepared = []
        for message in messages:
            if not isinstance(message, dict):
                raise ChatTemplateError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
            # Like transformers: a None value (OpenAI's content=None) is a missing key to the template.
            message = {key: value for key, value in message.items() if value is not None}
            if message.get("tool_calls"):
                message = _arguments_as_dicts(message)
            if isinstance(message.get("content"), list) and not self.accepts_content_parts:
                message["content"] = _text_of(message["content"])
            prepared.append(message)
        return prepared

    def render(self, messages: list[Message], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt text. ``extra`` reaches the template as variables (``documents``, ...).

        ``tools`` (OpenAI tool dicts) and tool history (assistant ``tool_calls``, ``role: "tool"``)
        go to the template as transformers passes them (arguments as dicts); a template without
        tool support gets them in the generic format (``cholla.tool_calling.generic``).
        """
        tools = tools or None
        if not self.supports_tools and (tools or any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
                                                     for m in messages)):
            messages, tools = generic_messages(messages, tools), None
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token}  # left undefined when absent, as transformers does
        variables = {"documents": None, **{k: v for k, v in tokens.items() if v is not None}, **extra, "tools": tools}
        try:
            return self._template.render(
                messages=self._prepare(messages), add_generation_prompt=add_generation_prompt, **variables
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {e}") from None
        except Exception as e:  # a template doing arithmetic on a missing field, and the like
            raise ChatTemplateError(f"the chat template failed on these messages ({type(e).__name__}: {e})") from None


def cut_after_final_message(rendered: str, messages: list[Message]) -> str:
    """The rendered conversation up to the end of the final message's text, so the model continues it.

    transformers' ``continue_final_message``: the template closes every turn, so the text
    after the final message's (last) text is cut off; where the template trimmed the
    message's whitespace, the cut falls after the trimmed text.
    """
    content = messages[-1].get("content") if messages else None
    if isinstance(content, list):
        texts = [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
        content = texts[-1] if texts else None
    if not isinstance(content, str) or not content.strip():
        raise ChatTemplateError("continue_final_message needs a final message with text to continue")
    at = rendered.rfind(content.strip())
    if at < 0:
        raise ChatTemplateError("the chat template changed the final message, so it cannot be continued; "
                                "send it without continue_final_message")
    # As transformers: the trailing whitespace is kept only where the template kept the message whole.
    kept = content.lstrip() if rendered[at : at + len(content.lstrip())] == content else content.strip()
    return rendered[: at + len(kept)]


def encode_chat(
    tokenizer: Tokenizer, template: ChatTemplate, messages: list[Message], add_generation_prompt: bool = True,
    continue_final_message: bool = False, **extra: Any
) -> list[int]:
    """Token ids of a rendered conversation, as ``apply_chat_template(tokenize=True)`` gives them.

    The template writes the special tokens it wants, so the text is encoded without adding any.
    One exception: a model that wants BOS gets it when the template did not write it (llama.cpp's
    behaviour; transformers would leave it out). A template that writes BOS never gets a second.
    ``continue_final_message``: the prompt stops inside the final message (``cut_after_final_message``).
    """
    text = template.render(messages, add_generation_prompt, **extra)
    if continue_final_message:
        text = cut_after_final_message(text, messages)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.add_bos and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids.insert(0, tokenizer.bos_token_id)
    return ids
