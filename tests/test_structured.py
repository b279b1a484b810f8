"""Structured output (cholla/sampling/structured.py) on the real default model.

The masks are checked against llguidance's own token-by-token verdicts, the outputs
against ``json.loads`` / ``jsonschema`` / ``re``, and the server against the real
``openai`` SDK (``chat.completions.parse`` with a Pydantic model).
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import llguidance
import openai
import pydantic
import pytest
import torch

from cholla import LLM, SamplingParams
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.errors import InvalidRequestError
from cholla.sampling.params import StructuredOutputsParams as Structured
from cholla.sampling.sampler import SamplingBatch, sample
from cholla.sampling.structured import DEAD_END, allowed_tokens
from cholla.serve import ServerSettings, create_app
from tests.test_serve import LiveServer

MODEL = "smollm2"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK_PERSON = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    # float32 is batch-invariant: a row's greedy tokens do not depend on its neighbours.
    return LLM(smollm2_path, dtype="float32", max_model_len=256, kv_cache_memory=32 * 2**20,
               enable_prefix_caching=False)


def _assert_all_blocks_free(llm: LLM) -> None:
    manager = llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks and not llm.engine.states


# -- parameters and compilation ------------------------------------------------------------


def test_params_take_exactly_one_valid_constraint():
    assert Structured(json='{"type": "string"}').json == {"type": "string"}
    for kwargs, needle in [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["b"]}, "regex, choice"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"json": 3}, "JSON schema"),
        ({"choice": []}, "non-empty list"),
        ({"choice": ["a", 1]}, "non-empty list"),
        ({"grammar": ""}, "non-empty string"),
    ]:
        with pytest.raises(InvalidRequestError, match=needle):
            Structured(**kwargs)
    with pytest.raises(InvalidRequestError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})


def test_invalid_inputs_fail_when_the_request_arrives(llm):
    engine = llm.engine
    cases = [
        (Structured(json={"type": "object", "properties": {"age": {"type": "integr"}}}), r"\$\.properties\.age\.type"),
        (Structured(json={"type": "object", "required": ["a"],
                          "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}}), "unsatisfiable"),
        (Structured(json={"type": "object", "properties": {"a": {"not": {}}}}), "Unimplemented keys"),
        (Structured(regex="a(b"), "unclosed group"),
        (Structured(grammar='root ::= ("yes" | no'), "Expected '\\)'"),
        (Structured(grammar="start: x"), "unknown name"),
        (Structured(regex="a[^\\x00-\\U0010FFFF]"), "admits no output"),
    ]
    for spec, needle in cases:
        with pytest.raises(InvalidRequestError, match=needle):
            engine.add_request("bad", "Hi", SamplingParams(structured_outputs=spec))
    assert not engine.states and not engine.has_unfinished_requests()
    # The engine keeps serving.
    out = llm.generate("Hi", SamplingParams(max_tokens=3, structured_outputs=Structured(choice=["yes", "no"])),
                       use_tqdm=False)[0].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop"


def test_grammars_are_cached_by_source(llm):
    structured = llm.engine.structured
    first = structured.compile(Structured(json=dict(PERSON)))
    assert structured.compile(Structured(json=json.dumps(PERSON))) is first


# -- masks -----------------------------------------------------------------------------------


def test_mask_matches_llguidance_token_by_token(llm):
    """Every token the bitmask allows, llguidance's matcher accepts as the next token, and no other."""
    structured, tokenizer = llm.engine.structured, llm.tokenizer
    compiled = structured.compile(Structured(json=PERSON))
    ours, reference = compiled.matcher(), llguidance.LLMatcher(compiled.tokenizer, compiled.grammar, log_level=0)
    text_so_far = '{"name": "Al'
    ours.consume(tokenizer.encode(text_so_far, add_special_tokens=False))
    reference.consume_tokens(tokenizer.encode(text_so_far, add_special_tokens=False))
    vocab = llm.engine.model_config.vocab_size
    bitmask = torch.zeros(1, structured.mask_words, dtype=torch.int32)
    structured.fill_bitmask([ours], bitmask)
    allowed = allowed_tokens(bitmask, vocab)[0]
    verdict = torch.tensor([reference.validate_tokens([t]) == 1 for t in range(vocab)])
    assert torch.equal(allowed, verdict)
    assert 0 < int(allowed.sum()) < vocab
    assert not any(allowed[t] for t in llm.engine.eos_token_ids)  # inside a string: no end yet


def test_sampler_masks_only_constrained_rows():
    vocab = 100
    logits = torch.randn(3, vocab)
    allowed = torch.zeros(2, vocab, dtype=torch.bool)
    allowed[0, [5, 7]] = True
    allowed[1, [60]] = True
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1)]
    batch = SamplingBatch.build(params, [[1]] * 3, [[]] * 3, [None, None, torch.Generator().manual_seed(1)], vocab,
                                "cpu", allowed=([0, 2], allowed))
    tokens = sample(logits, batch).token_ids.tolist()
    assert tokens[0] == [5, 7][int(logits[0, [5, 7]].argmax())]
    assert tokens[1] == int(logits[1].argmax())  # unconstrained
    assert tokens[2] == 60


# -- generation on the real model ---------------------------------------------------------------


def test_outputs_follow_their_constraints(llm):
    greedy = dict(temperature=0.0, max_tokens=48)
    constraints = {
        "schema": Structured(json=PERSON),
        "object": Structured(json_object=True),
        "regex": Structured(regex=r"[0-9]{3}-[0-9]{4}"),
        "choice": Structured(choice=["Paris", "London", "Berlin"]),
        "gbnf": Structured(grammar='root ::= "The answer is " ("yes" | "no") "."'),
    }
    prompts = [ASK_PERSON, ASK_PERSON,
               [{"role": "user", "content": "Give me a phone number."}],
               [{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Is water wet?"}]]
    outs = llm.chat(prompts, [SamplingParams(**greedy, structured_outputs=c) for c in constraints.values()],
                    use_tqdm=False)
    texts = {name: out.outputs[0].text for name, out in zip(constraints, outs)}
    assert all(out.outputs[0].finish_reason == "stop" for out in outs), texts
    jsonschema.validate(json.loads(texts["schema"]), PERSON)
    assert isinstance(json.loads(texts["object"]), dict)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts["regex"])
    assert texts["choice"] in ("Paris", "London", "Berlin")
    assert re.fullmatch(r"The answer is (yes|no)\.", texts["gbnf"])
    _assert_all_blocks_free(llm)


def test_batched_with_unconstrained_rows_and_n(llm):
    """Constrained and unconstrained rows share steps; the unconstrained ones come out as they do alone."""
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "List three colours:"]
    alone = [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)]
    sampled = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=48, structured_outputs=Structured(json=PERSON))
    chat = {"prompt_token_ids": llm.encode_messages(ASK_PERSON)}
    outs = llm.generate([prompts[0], chat, prompts[1]], [plain, sampled, plain], use_tqdm=False)
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == alone
    assert len(outs[1].outputs) == 3
    for completion in outs[1].outputs:  # one matcher per sequence
        assert completion.finish_reason in ("stop", "length")
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), PERSON)
    _assert_all_blocks_free(llm)


def test_fast_forward_and_preemption(smollm2_path):
    """Forced tokens skip their own forward pass; preempted requests recompute and keep their grammar state."""
    schema = {"type": "object", "properties": {"first_name_of_the_person": {"type": "string", "maxLength": 12},
                                               "year_of_birth_of_the_person": {"type": "integer"}},
              "required": ["first_name_of_the_person", "year_of_birth_of_the_person"], "additionalProperties": False}
    params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=Structured(json=schema))
    roomy = LLM(smollm2_path, dtype="float32", max_model_len=128, kv_cache_memory=16 * 2**20)
    prompt = {"prompt_token_ids": roomy.encode_messages(ASK_PERSON)}
    ref = roomy.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    steps = roomy.engine.metrics.steps
    jsonschema.validate(json.loads(ref.text), schema)
    assert steps < len(ref.token_ids)  # the long key names were appended without a step each
    # With logprobs asked for, every token is sampled: one step per token.
    logged = roomy.generate(prompt, SamplingParams(**{**params.__dict__, "logprobs": 0}), use_tqdm=False)
    jsonschema.validate(json.loads(logged[0].outputs[0].text), schema)
    assert roomy.engine.metrics.steps - steps == len(logged[0].outputs[0].token_ids)

    # Room for about three of the four sequences: the newest is preempted and recomputed.
    from cholla.kv.paged_cache import bytes_per_block

    block_bytes = bytes_per_block(roomy.engine.model_config, 16, torch.float32)
    tight = LLM(smollm2_path, dtype="float32", max_model_len=128, kv_cache_memory=12 * block_bytes,
                enable_prefix_caching=False)
    outs = tight.generate([prompt] * 4, params, use_tqdm=False)
    assert tight.engine.metrics.preemptions > 0
    assert [o.outputs[0].text for o in outs] == [ref.text] * 4
    _assert_all_blocks_free(tight)


def test_dead_end_finishes_with_a_reason(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=Structured(regex="[a-z]+ [a-z]+"))
    engine.add_request("dead", "Hi", params)
    engine.add_request("alive", "Hi", SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    engine.step()
    request = engine.states["dead"].request
    assert request.output_token_ids and request.grammar.error is None
    request.grammar.consume(llm.tokenizer.encode("123", add_special_tokens=False))  # a token the grammar refuses
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
    assert finished["dead"].finish_reason == "error" and finished["dead"].stop_reason.startswith(DEAD_END)
    assert len(finished["alive"].token_ids) == 4
    _assert_all_blocks_free(llm)


# -- the server --------------------------------------------------------------------------------


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int


@pytest.fixture(scope="module")
def server(smollm2_path):
    config = EngineConfig(max_model_len=256, kv_cache_memory=32 * 2**20, dtype="float32")
    app = create_app(ServerSettings([MODEL]), lambda: LLMEngine(smollm2_path, config))
    with LiveServer(app) as live:
        live.wait_ready()
        yield live


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_parse_and_json_object(client):
    completion = client.chat.completions.parse(model=MODEL, messages=ASK_PERSON, response_format=Person,
                                               temperature=0, max_tokens=48)
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and completion.choices[0].finish_reason == "stop"

    stream = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, max_tokens=48, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert isinstance(json.loads(text), dict)


def test_every_spelling_of_a_constraint(client, server):
    colours = ["red", "green", "blue"]
    ask = [{"role": "user", "content": "Name a colour."}]
    for extra in [{"guided_choice": colours}, {"structured_outputs": {"choice": colours}},
                  {"grammar": 'root ::= "red" | "green" | "blue"'},
                  {"guided_grammar": 'root ::= "red" | "green" | "blue"'}]:
        reply = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=8, extra_body=extra)
        assert reply.choices[0].message.content in colours, extra
    completion = client.completions.create(model=MODEL, prompt="My phone number is", max_tokens=12,
                                           extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", completion.choices[0].text)
    for extra in [{"json_schema": PERSON}, {"guided_json": PERSON}, {"structured_outputs": {"json": PERSON}},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON,
                                                                                "strict": True}}}]:
        reply = client.completions.create(model=MODEL, prompt='A person as JSON: ', max_tokens=40, temperature=0,
                                          extra_body=extra)
        jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_bad_constraints_get_400(client, server):
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         r"\$\.type"),
        ({"response_format": {"type": "xml"}}, "response_format type 'xml' is not supported"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "needs json_schema.schema"),
        ({"guided_regex": "a(b"}, "unclosed group"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "send only one"),
        ({"structured_outputs": {"regex": "a", "frob": 1}}, "frob"),
    ]
    for extra, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model=MODEL, messages=ASK_PERSON, max_tokens=4, extra_body=extra)
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert not server.engine.states
