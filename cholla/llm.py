"""The offline Python API, shaped like vLLM's: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Sequence

from tqdm import tqdm

from cholla.download import resolve_model
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.engine.outputs import CompletionOutput, RequestOutput
from cholla.sampling.params import SamplingParams
from cholla.tokenizer.chat_template import ChatTemplate, encode_chat
from cholla.tool_calling.plan import ToolChoice, plan_tools

Prompt = str | list[int] | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Load a model (a path or a known name such as ``smollm2``) and generate from it.

    Keyword arguments are ``EngineConfig`` fields: ``max_model_len``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``kv_cache_memory``,
    ``block_size``, ``enable_prefix_caching``, ``dtype`` (``"auto"``, the
    default: ``"bfloat16"`` where cholla's C++ kernels run, else ``"float32"``,
    the reference), ``threads``, ``kv_cache_dtype`` (``"auto"``, ``"bf16"``,
    ``"int8"``, ``"q8_0"``, ``"fp8"``, ...: ``cholla/kv/kv_types.py``),
    ``cache_type_k`` / ``cache_type_v`` (one side each), ``speculative_method``
    (``"ngram"``: prompt lookup; ``"draft"``: a smaller model given as ``draft_model``,
    a path, known name or ``LoadedModel``, with the same vocabulary; ``"tree"``: prompt
    lookup's alternatives as a token tree of ``spec_tree_budget`` nodes; ``"layer_skip"``: the
    model without layers ``spec_skip_layers`` drafts for itself; default None, off),
    ``num_speculative_tokens``, ``speculative_ngram_cache_size`` (n-grams shared
    across requests for ``"ngram"`` and ``"tree"``; 0: off), and
    ``kv_offload_dir`` / ``kv_offload_gib`` (the KV cache's disk tier: evicted
    prefix blocks kept in files, read back by later requests and after restarts;
    ``close()`` finishes its writes).
    """

    def __init__(self, model: str | os.PathLike | None = None, **engine_kwargs: Any):
        self.engine = LLMEngine(resolve_model(model), EngineConfig(**engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self.chat_template = ChatTemplate.for_tokenizer(self.tokenizer)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run every prompt through the scheduler together; outputs come back in prompt order."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        base = f"generate-{id(prompts)}-"
        order: list[tuple[str, int]] = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            order.append((f"{base}{i}", p.n))
            try:
                self.engine.add_request(f"{base}{i}", prompt, p)
            except Exception:
                for request_id, _ in order:
                    self.engine.abort(request_id)
                raise
        finished: dict[str, RequestOutput] = {}
        total = sum(n for _, n in order)
        with tqdm(total=total, desc="generating", disable=not use_tqdm or total < 8, unit="seq") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step(finished_only=True):
                    finished[out.request_id] = out
                    bar.update(1)
        results = []
        for request_id, n in order:
            if n == 1:
                results.append(finished[request_id])
                continue
            subs = [finished[f"{request_id}#{j}"] for j in range(n)]
            results.append(RequestOutput(request_id, subs[0].prompt, subs[0].prompt_token_ids,
                                         [s.outputs[0] for s in subs], True, subs[0].metrics, subs[0].prompt_logprobs))
        return results

    def encode_messages(self, messages: list[Message], add_generation_prompt: bool = True,
                        tools: list[dict[str, Any]] | None = None) -> list[int]:
        return encode_chat(self.tokenizer, self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           tools=tools)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: ToolChoice | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or many) and generate replies.

        ``tools`` (OpenAI tool dicts) go through the template; each completion's ``tool_calls``
        then holds the calls read from its text (``[]`` when it made none). ``tool_choice``
        is OpenAI's: ``"auto"`` (default), ``"none"``, ``"required"`` or a named function.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        end_texts = tuple(self.tokenizer.decode([i], skip_special_tokens=False) for i in sorted(self.tokenizer.eog_token_ids))
        plan = plan_tools(self.chat_template, tools, tool_choice, end_texts=end_texts)
        prompts = [{"prompt_token_ids": self.encode_messages(c, tools=plan.tools)} for c in conversations]
        params = sampling_params or SamplingParams()
        if plan.parser is not None:
            params = dataclasses.replace(params, **plan.sampling_kwargs())
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm)
        if plan.parser is not None:
            for output in outputs:
                for completion in output.outputs:
                    completion.text = plan.reply_text(completion.text, finished=True)  # no end-of-turn token text
                    completion.tool_calls = plan.parse(completion.text)[1]
        return outputs

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[CompletionOutput]:
        """Yield the growing completion of one prompt after every new token."""
        request_id = f"stream-{id(prompt)}"
        params = sampling_params or SamplingParams()
        self.engine.add_request(request_id, prompt, params)
        try:
            done = False
            while not done:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        done = out.finished
                        yield out.outputs[0]
        finally:
            self.engine.abort(request_id)

    def close(self) -> None:
        """Finish the KV disk tier's writes (``kv_offload_dir``); nothing to do without one."""
        self.engine.close()
