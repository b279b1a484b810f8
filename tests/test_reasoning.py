"""Reasoning parsers on fixed texts: what each format separates, and streaming that agrees with the whole text
however the text is cut (one character at a time, and in two pieces at every position)."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from cholla import LLM, SamplingParams
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.reasoning import PARSERS, ReasoningParserError, Split, choose_parser
from cholla.serve import ServerSettings, create_app
from tests.test_serve import LiveServer

THINK = [
    # (text, prompt opened <think>, expected reasoning, expected answer)
    ("<think>\nLet me add.\n2+2=4\n</think>\n\nIt is 4.", False, "Let me add.\n2+2=4", "It is 4."),
    ("  <think>x</think>y", False, "x", "y"),
    ("<think>\n\n</think>\n\nHi", False, "", "Hi"),
    ("Hello <think>not reasoning</think>", False, None, "Hello <think>not reasoning</think>"),
    ("No tags at all.", False, None, "No tags at all."),
    ("<thin", False, None, "<thin"),
    ("", False, None, ""),
    ("<think>\nstill thinking when cut off <", False, "still thinking when cut off <", ""),
    ("Prompt opened it.\n</think>\n\nAnswer </thin", True, "Prompt opened it.", "Answer </thin"),
    ("never closed  \n", True, "never closed", ""),
    ("a < b </ c </think>d", True, "a < b </ c", "d"),
    ("", True, "", ""),
]

HARMONY = [
    ("<|channel|>analysis<|message|>User greets. Reply.<|end|><|start|>assistant<|channel|>final<|message|>Hello!",
     "User greets. Reply.", "Hello!"),
    ("<|channel|>final<|message|>Just the answer.<|return|>", None, "Just the answer."),
    ("<|channel|>analysis<|message|>one<|end|><|start|>assistant<|channel|>analysis<|message|>two<|end|>"
     "<|start|>assistant<|channel|>final<|message|>done", "one\ntwo", "done"),
    ("<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather"
     " <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>", "Need weather.",
     "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>"),
    ("<|channel|>analysis<|message|>cut off mid <|en", "cut off mid <|en", ""),
    ("<|channel|>analysis<|message|>x<|end|><|start|>assist", "x", ""),
    ("Plain text from a model that ignores the format.", None, "Plain text from a model that ignores the format."),
    ("<|channel|>final<|message|>a<|end|>\n trailing words", None, "a\n trailing words"),
    ("<|sta", None, ""),
    ("", None, ""),
]


def _streamed(parser, text: str, pieces: list[str], starts: bool) -> Split:
    stream = parser.stream(starts)
    reasoning, content, seen = "", "", False
    for part in [*(stream.feed(p) for p in pieces), stream.finish()]:
        reasoning += part.reasoning or ""
        content += part.content
        seen = seen or part.reasoning is not None
    return Split(reasoning if seen else None, content)


def _cuts(text: str) -> list[list[str]]:
    singles = [list(text)]
    halves = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    return singles + halves


@pytest.mark.parametrize("text,starts,reasoning,content", THINK)
def test_think_whole_and_streamed(text, starts, reasoning, content):
    parser = PARSERS["think"]
    assert parser.split(text, starts) == Split(reasoning, content)
    for pieces in _cuts(text):
        assert _streamed(parser, text, pieces, starts) == Split(reasoning, content), pieces


@pytest.mark.parametrize("text,reasoning,content", HARMONY)
def test_harmony_whole_and_streamed(text, reasoning, content):
    parser = PARSERS["harmony"]
    assert parser.split(text) == Split(reasoning, content)
    for pieces in _cuts(text):
        assert _streamed(parser, text, pieces, False) == Split(reasoning, content), pieces


def test_streamed_reasoning_arrives_before_the_answer_ends():
    """Deltas flow as they come: nothing but a possible marker is held back."""
    stream = PARSERS["think"].stream()
    assert stream.feed("<think>Step one") == Split("Step one", "")
    assert stream.feed(" and two </th") == Split(" and two", "")
    assert stream.feed("ink>\n\nThe answer") == Split("", "The answer")
    harmony = PARSERS["harmony"].stream()
    assert harmony.feed("<|channel|>analysis<|message|>Hmm") == Split("Hmm", "")
    assert harmony.feed("<|end|><|start|>assistant<|channel|>final<|message|>Hi") == Split("", "Hi")


def test_prompt_opened_reasoning_is_detected_from_the_prompt_end():
    think = PARSERS["think"]
    assert think.starts_in_reasoning("<|im_start|>assistant\n<think>\n")
    assert not think.starts_in_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not think.starts_in_reasoning("<|im_start|>assistant\n")
    assert not PARSERS["harmony"].starts_in_reasoning("<|start|>assistant")


def test_choose_parser_from_the_template():
    assert choose_parser("auto", "{{ '<|start|>assistant<|channel|>final<|message|>' }}").name == "harmony"
    assert choose_parser("auto", "{%- if '</think>' in content %}...{% endif %}").name == "think"
    assert choose_parser("auto", "{{ '<|im_start|>assistant\n' }}") is None
    assert choose_parser("auto", None) is None
    assert choose_parser("none", "</think>") is None
    assert choose_parser("qwen3", None).name == "think"
    assert choose_parser("openai_gptoss", None).name == "harmony"
    with pytest.raises(ReasoningParserError, match="unknown reasoning parser 'magic'"):
        choose_parser("magic", None)


# -- a tiny Qwen 3 that thinks, served ----------------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"
QWEN3_TEMPLATE = (FIXTURES / "tool_templates" / "qwen3.jinja").read_text()  # Qwen/Qwen3-0.6B's own
# DeepSeek-R1's way: the generation prompt itself opens the reasoning.
OPENED_TEMPLATE = QWEN3_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking",
                                         "{{- '<|im_start|>assistant\\n<think>' }}\n    {%- if enable_thinking")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def build_thinking_qwen3(path: Path, template: str) -> None:
    """A random Qwen 3 (transformers' own, saved as SafeTensors) whose greedy reply is ``<think>Because</think>Paris``.

    Attention and MLP outputs are zeroed, so each position's logits depend on its own token only:
    each token of the chain gets an embedding of its own direction, and the LM head row of the
    token to follow points the same way. The vocabulary is a small byte-level BPE with Qwen 3's
    special tokens (``<think>`` and ``</think>`` are plain added tokens there, as in Qwen 3).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["Because Paris is the answer. The user asks; the assistant answers.\n\n"] * 50, trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (path / "chat_template.jinja").write_text(template)

    def one(text: str) -> int:
        (token,) = tokenizer.encode(text).ids
        return token

    sequence = [one("\n"), one("<think>"), one("Because"), one("</think>"), *tokenizer.encode("Paris").ids, one("<|im_end|>")]
    following = dict(zip(sequence, sequence[1:]))
    following[one("\n\n")] = tokenizer.encode("Paris").ids[0]  # after enable_thinking=False's empty block
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=one("<|im_end|>"))
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for direction, (token, next_token) in enumerate(following.items()):
            model.model.embed_tokens.weight[token] = 0
            model.model.embed_tokens.weight[token, direction] = 1.0
            model.lm_head.weight[next_token, direction] += 10.0
    model.save_pretrained(path, safe_serialization=True)


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen3-thinking")
    build_thinking_qwen3(path, QWEN3_TEMPLATE)
    return path


def _serve(path: Path, reasoning_parser: str = "auto") -> LiveServer:
    config = EngineConfig(max_model_len=256, max_num_seqs=4, kv_cache_memory=8 * 2**20, dtype="float32")
    return LiveServer(create_app(ServerSettings(["qwen3-tiny"], reasoning_parser=reasoning_parser),
                                 lambda: LLMEngine(path, config)))


@pytest.fixture(scope="module")
def thinking_server(thinking_model):
    with _serve(thinking_model) as server:
        server.wait_ready()
        yield server


def test_tiny_qwen3_thinks_as_built(thinking_model):
    """The raw greedy reply (no parser): what every surface below must take apart."""
    llm = LLM(thinking_model, dtype="float32", max_model_len=256, kv_cache_memory=8 * 2**20)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    assert llm.chat(QUESTION, greedy, use_tqdm=False)[0].outputs[0].text == "<think>Because</think>Paris"
    reference = transformers.AutoModelForCausalLM.from_pretrained(thinking_model, dtype=torch.float32)
    ids = llm.encode_messages(QUESTION)
    expected = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
    assert llm.tokenizer.decode(expected.tolist()) == "<think>Because</think>Paris"


def test_openai_chat_reasoning_content(thinking_server):
    client = openai.OpenAI(base_url=f"{thinking_server.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="qwen3-tiny", messages=QUESTION, temperature=0)
    message = reply.choices[0].message
    assert (message.content, message.reasoning_content) == ("Paris", "Because")
    assert reply.choices[0].finish_reason == "stop"

    chunks = list(client.chat.completions.create(model="qwen3-tiny", messages=QUESTION, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Because"
    assert "".join(d.content or "" for d in deltas) == "Paris"
    first_reasoning = next(i for i, d in enumerate(deltas) if getattr(d, "reasoning_content", None))
    first_content = next(i for i, d in enumerate(deltas) if d.content)
    assert first_reasoning < first_content

    off = client.chat.completions.create(model="qwen3-tiny", messages=QUESTION, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert (off.choices[0].message.content, off.choices[0].message.reasoning_content) == ("Paris", None)
    # A constrained reply is not read for reasoning: the grammar covers all of it.
    constrained = client.chat.completions.create(model="qwen3-tiny", messages=QUESTION, temperature=0, max_tokens=4,
                                                 response_format={"type": "json_object"})
    assert getattr(constrained.choices[0].message, "reasoning_content", None) is None
    assert constrained.choices[0].message.content.startswith("{")
    effort = client.chat.completions.create(model="qwen3-tiny", messages=QUESTION, temperature=0, reasoning_effort="none")
    assert (effort.choices[0].message.content, effort.choices[0].message.reasoning_content) == ("Paris", None)

    # The reply appended to the history as the SDK dumps it (reasoning_content included) is accepted.
    history = [*QUESTION, {"role": "assistant", "content": "Paris", "reasoning_content": "Because"}]
    assert client.chat.completions.create(model="qwen3-tiny", messages=history, max_tokens=1).usage.prompt_tokens \
        == client.chat.completions.create(model="qwen3-tiny", messages=[*QUESTION, {"role": "assistant", "content": "Paris"}],
                                          max_tokens=1).usage.prompt_tokens + 2


def test_reasoning_parser_none_and_prompt_opened_thinking(thinking_model, tmp_path):
    with _serve(thinking_model, reasoning_parser="none") as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        message = client.chat.completions.create(model="qwen3-tiny", messages=QUESTION, temperature=0).choices[0].message
        assert message.content == "<think>Because</think>Paris" and getattr(message, "reasoning_content", None) is None

    opened = tmp_path / "opened"
    build_thinking_qwen3(opened, OPENED_TEMPLATE)
    with _serve(opened) as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        prompt = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}).json()["tokens"]
        text = httpx.post(f"{server.url}/detokenize", json={"tokens": prompt}).json()["prompt"]
        assert text.endswith("assistant\n<think>")  # the template opened the reasoning
        raw = client.completions.create(model="qwen3-tiny", prompt=prompt, temperature=0, max_tokens=8)
        assert raw.choices[0].text == "Because</think>Paris"  # the output starts inside the reasoning
        message = client.chat.completions.create(model="qwen3-tiny", messages=QUESTION, temperature=0).choices[0].message
        assert (message.content, message.reasoning_content) == ("Paris", "Because")


def test_anthropic_thinking_blocks_switch_and_budget(thinking_server):
    claude = anthropic.Anthropic(base_url=thinking_server.url, api_key="unused", max_retries=0)
    greedy = {"extra_body": {"temperature": 0}}
    reply = claude.messages.create(model="qwen3-tiny", messages=QUESTION, max_tokens=16, **greedy)
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in reply.content] \
        == [("thinking", "Because"), ("text", "Paris")]
    assert reply.stop_reason == "end_turn"

    with claude.messages.stream(model="qwen3-tiny", messages=QUESTION, max_tokens=16, **greedy) as stream:
        events = [event for event in stream]
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] \
        == [("thinking", "Because"), ("text", "Paris")]
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas.index("thinking_delta") < deltas.index("text_delta")

    off = claude.messages.create(model="qwen3-tiny", messages=QUESTION, max_tokens=16, thinking={"type": "disabled"},
                                 **greedy)
    assert [(b.type, b.text) for b in off.content] == [("text", "Paris")]
    on = {"type": "enabled", "budget_tokens": 1}
    assert claude.messages.count_tokens(model="qwen3-tiny", messages=QUESTION, thinking={"type": "disabled"}).input_tokens \
        == claude.messages.count_tokens(model="qwen3-tiny", messages=QUESTION, thinking=on).input_tokens + 4

    # One token of budget: <think>, then the reasoning is closed for it and the model answers.
    budgeted = claude.messages.create(model="qwen3-tiny", messages=QUESTION, max_tokens=16, thinking=on, **greedy)
    assert [(b.type, b.text) for b in budgeted.content] == [("text", "Paris")]
    with claude.messages.stream(model="qwen3-tiny", messages=QUESTION, max_tokens=16, thinking=on, **greedy) as stream:
        assert [(b.type, b.text) for b in stream.get_final_message().content] == [("text", "Paris")]
    with pytest.raises(anthropic.BadRequestError, match="budget_tokens"):
        claude.messages.create(model="qwen3-tiny", messages=QUESTION, max_tokens=16,
                               thinking={"type": "enabled", "budget_tokens": 16})


def test_responses_reasoning_items(thinking_server):
    client = openai.OpenAI(base_url=f"{thinking_server.url}/v1", api_key="unused", max_retries=0)
    response = client.responses.create(model="qwen3-tiny", input=QUESTION, temperature=0)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "Because" and response.output_text == "Paris"
    assert response.status == "completed" and 0 < response.usage.output_tokens_details.reasoning_tokens < 3

    events = list(client.responses.create(model="qwen3-tiny", input=QUESTION, temperature=0, stream=True))
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (reasoning, text) == ("Because", "Paris")
    final = events[-1]
    assert final.type == "response.completed" and [i.type for i in final.response.output] == ["reasoning", "message"]
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]
    with client.responses.stream(model="qwen3-tiny", input=QUESTION, temperature=0) as stream:
        assert stream.get_final_response().output_text == "Paris"

    # Chained: the reasoning item goes back to the template as the assistant turn's reasoning_content.
    chained = client.responses.create(model="qwen3-tiny", input="Sure?", previous_response_id=response.id, temperature=0)
    assert chained.output_text == "Paris"
    none = client.responses.create(model="qwen3-tiny", input=QUESTION, temperature=0, reasoning={"effort": "none"})
    assert [item.type for item in none.output] == ["message"] and none.output_text == "Paris"
    # A reasoning item in the input reaches the template as the next assistant message's reasoning_content.
    turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Paris"}]
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Because"}]}
    plain = client.responses.create(model="qwen3-tiny", input=turn, max_output_tokens=1)
    with_reasoning = client.responses.create(model="qwen3-tiny", input=[turn[0], thought, turn[1]], max_output_tokens=1)
    # The template writes <think>\n\n</think> without it, <think>\nBecause\n</think> with it: "\n\n" -> "\n", "Because", "\n".
    assert with_reasoning.usage.input_tokens == plain.usage.input_tokens + 2
