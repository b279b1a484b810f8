"""The ``cholla`` command: run, chat, serve, bench, info, plan, pull.

Every failure the user can fix (a missing file, a corrupt model, a prompt too
long) prints one line and exits with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback

from cholla.errors import ChollaError
from cholla.reasoning import ALIASES, PARSERS

EXIT_USER_ERROR = 2
REASONING_PARSER_CHOICES = ["auto", "none", *PARSERS, *ALIASES]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=int, default=None, help="context length to serve (default: the model's, capped by the KV cache)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB", help="KV cache size in GiB")
    _add_kv_type_options(p)
    p.add_argument("--kv-offload-dir", default=None, metavar="DIR",
                   help="keep prefix-cache blocks evicted from memory in files here, read back by later requests "
                        "and after restarts (default: off)")
    p.add_argument("--kv-offload-gib", type=float, default=8.0, metavar="GIB",
                   help="most disk space --kv-offload-dir takes, least recently used blocks out (default 8)")
    _add_compute_options(p)
    _add_speculative_options(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _add_speculative_options(p: argparse.ArgumentParser, ngram_cache_size: int | None = None) -> None:
    from cholla.speculative.config import (
        DEFAULT_NGRAM_CACHE_SIZE,
        DEFAULT_TREE_BUDGET,
        MAX_TREE_BUDGET,
    )

    ngram_cache_size = DEFAULT_NGRAM_CACHE_SIZE if ngram_cache_size is None else ngram_cache_size

    p.add_argument("--speculative-method", choices=["ngram", "draft", "tree", "layer_skip"], default=None,
                   help="ngram: draft tokens from the prompt and output (prompt lookup) and verify them in one step; "
                        "draft: a smaller model with the same vocabulary drafts them (--draft-model); "
                        "tree: prompt lookup's alternative continuations as one token tree (--spec-tree-budget); "
                        "layer_skip: the model drafts without some of its layers (--spec-skip-layers; on the small "
                        "models measured so far it never pays, and the engine then decodes plainly); "
                        "the output keeps its distribution, sampled or greedy (default: off)")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="with --speculative-method draft: the drafting model (a path or a known name) sharing the "
                        "model's tokenizer")
    p.add_argument("--num-speculative-tokens", type=int, default=4, metavar="K",
                   help="drafts verified per step with --speculative-method, 1-16 (default 4)")
    p.add_argument("--speculative-ngram-cache-size", type=int, default=ngram_cache_size, metavar="N",
                   help="n-grams of earlier requests kept for drafting (LRU, ~350 bytes each; 0: only the "
                        f"request's own tokens; default {ngram_cache_size})")
    p.add_argument("--spec-tree-budget", type=int, default=DEFAULT_TREE_BUDGET, metavar="N",
                   help=f"with --speculative-method tree: drafted nodes verified per step and sequence, 1-{MAX_TREE_BUDGET}, "
                        f"depth at most K (default {DEFAULT_TREE_BUDGET})")
    p.add_argument("--spec-skip-layers", default=None, metavar="LAYERS",
                   help="with --speculative-method layer_skip: the layers the draft leaves out, e.g. '8-15', '4,6,8' "
                        "or '4-20:2' (every 2nd); default: the best of a few sets tried at start")


def _add_kv_type_options(p: argparse.ArgumentParser) -> None:
    from cholla.kv.kv_types import KV_CACHE_TYPE_NAMES

    types = ", ".join(KV_CACHE_TYPE_NAMES)
    p.add_argument("--kv-cache-dtype", default="auto", metavar="TYPE",
                   help=f"what the KV cache holds, K and V: {types} (default auto: bf16 with bfloat16 matmuls, else f32)")
    p.add_argument("--cache-type-k", default=None, metavar="TYPE", help="the keys' type, overriding --kv-cache-dtype")
    p.add_argument("--cache-type-v", default=None, metavar="TYPE", help="the values' type, overriding --kv-cache-dtype")


def _add_compute_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto (default): bfloat16 where cholla's C++ kernels run, else float32; "
                        "float32: fp32 matmuls, the reference; bfloat16: batches multiply in bf16, faster")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for every step (default: one per physical core for decode steps, "
                        "one per core other programs leave free for prompt steps)")


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("-t", "--temperature", type=float, default=0.8, help="0 means greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k likeliest tokens, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p x the top probability (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1 = off")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-generation tokens")
    constraint = p.add_mutually_exclusive_group()
    constraint.add_argument("--json-schema", default=None, metavar="SCHEMA|@FILE",
                            help="answer with JSON that follows this JSON schema (text, or @ and a file)")
    constraint.add_argument("--grammar", default=None, metavar="GBNF|@FILE",
                            help="answer in this GBNF (llama.cpp) or Lark grammar (text, or @ and a file)")
    constraint.add_argument("--json-object", action="store_true", help="answer with a JSON object")


# cholla serve's request limits (``serve.limits.RequestLimits``): flag, field, what, default. The
# defaults are repeated here so that the parser does not import the server (seconds, for every command).
LIMIT_OPTIONS = (
    ("--max-body-size", "max_body_bytes", "largest request body in MiB; larger gets 413", 8),
    ("--max-json-depth", "max_json_depth", "deepest nesting of a JSON body", 64),
    ("--max-messages", "max_messages", "most messages in one request", 2048),
    ("--max-content-parts", "max_content_parts", "most content parts in one message", 256),
    ("--max-stop", "max_stop", "most stop strings in one request", 16),
    ("--max-stop-length", "max_stop_length", "longest stop string, in characters", 256),
    ("--max-n", "max_n", "most completions (n) per prompt", 16),
    ("--max-logprobs", "max_logprobs", "most top logprobs per token", 20),
)


def _add_limit_options(p: argparse.ArgumentParser) -> None:
    for flag, field, what, default in LIMIT_OPTIONS:
        p.add_argument(flag, type=float if field == "max_body_bytes" else int, default=None, dest=field,
                       metavar="MIB" if field == "max_body_bytes" else "N", help=f"{what} (default {default})")


def _request_limits(args: argparse.Namespace):
    from cholla.serve.limits import RequestLimits

    given = {field: getattr(args, field) for _, field, _, _ in LIMIT_OPTIONS if getattr(args, field) is not None}
    if "max_body_bytes" in given:
        given["max_body_bytes"] = int(given["max_body_bytes"] * 2**20)
    return RequestLimits(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cholla", description="Run LLMs from GGUF and SafeTensors files.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate an answer to one prompt, streamed")
    run.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help="model (path or known name; default smollm2) and prompt")
    run.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    run.add_argument("--system", default=None, metavar="TEXT", help="system message")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    _add_sampling_options(run)
    _add_model_options(run)

    chat = sub.add_parser("chat", help="talk with a model in the terminal (/help inside for commands)")
    chat.add_argument("model", nargs="?", default=None, help="path or known name (default smollm2)")
    chat.add_argument("--system", default=None, metavar="TEXT", help="system message")
    _add_sampling_options(chat)
    _add_model_options(chat)

    serve = sub.add_parser("serve", help="serve a model over HTTP: OpenAI and Anthropic APIs, metrics, a chat page")
    serve.add_argument("model", nargs="?", default=None, help="path or known name (default smollm2)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=os.environ.get("CHOLLA_API_KEY"),
                       help="require this key on every route but /health (default: $CHOLLA_API_KEY, else none)")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model names the API answers to (default: the MODEL argument)")
    serve.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch (default 64)")
    serve.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens in one step (default 2048)")
    serve.add_argument("--no-prefix-caching", action="store_true", help="turn off the prefix cache")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="sequences that may wait beyond --max-num-seqs; more get 503 + Retry-After (default 1024)")
    serve.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                       help="let browsers on these origins call the API (CORS): '*' or origins, or vLLM's JSON list "
                            "(default: none, CORS off)")
    serve.add_argument("--allowed-methods", nargs="+", default=["*"], metavar="METHOD",
                       help="CORS: allowed methods (default '*')")
    serve.add_argument("--allowed-headers", nargs="+", default=["*"], metavar="HEADER",
                       help="CORS: allowed request headers (default '*')")
    serve.add_argument("--allow-credentials", action="store_true", help="CORS: allow cookies and credentials")
    serve.add_argument("--max-stored-responses", type=int, default=1000, metavar="N",
                       help="responses the Responses API keeps for previous_response_id, least recently used out "
                            "(default 1000)")
    serve.add_argument("--reasoning-parser", default="auto", choices=REASONING_PARSER_CHOICES, metavar="NAME",
                       help="separate a reasoning model's thinking: think, harmony, auto (from the chat template; "
                            "the default) or none")
    _add_limit_options(serve)
    _add_model_options(serve)

    info = sub.add_parser("info", help="describe a model file")
    info.add_argument("model", nargs="?", default=None)
    info.add_argument("--json", action="store_true")
    info.add_argument("--debug", action="store_true")

    bench = sub.add_parser("bench", help="measure prefill (pp) and decode (tg) speed, like llama-bench")
    bench.add_argument("model", nargs="?", default=None, help="path or known name (default smollm2)")
    bench.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens to prefill, 0 = skip (default 512)")
    bench.add_argument("-n", "--n-gen", type=int, default=128, help="tokens to decode, 0 = skip (default 128)")
    bench.add_argument("-r", "--repetitions", type=int, default=3, help="runs of each test (default 3)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--profile", action="store_true", help="then profile one more run of each test, op by op")
    bench.add_argument("--kv-cache-dtype", default="auto", metavar="TYPE", help="what the KV cache holds (as for run)")
    _add_compute_options(bench)
    _add_speculative_options(bench, ngram_cache_size=0)
    bench.add_argument("--debug", action="store_true")

    plan = sub.add_parser("plan", help="KV cache memory, concurrency and a roofline speed estimate, from metadata alone")
    plan.add_argument("model", nargs="?", default=None, help="path or known name (default smollm2)")
    plan.add_argument("--context", type=int, default=None, metavar="N",
                      help="tokens per request, the engine's --max-model-len (default: the model's, capped by the KV cache)")
    plan.add_argument("--concurrency", type=int, default=1, metavar="N", help="target requests in flight (default 1)")
    plan.add_argument("--memory", type=float, default=None, metavar="GIB", help="total memory; the KV cache gets what the weights leave")
    plan.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB", help="KV cache size in GiB, as the engine's flag")
    _add_kv_type_options(plan)
    plan.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="the matmuls' dtype, for --kv-cache-dtype auto")
    plan.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV block (default 16)")
    plan.add_argument("--max-num-seqs", type=int, default=64, metavar="N",
                      help="as the engine's: caps a hybrid model's state slots (default 64)")
    plan.add_argument("--hardware", default=None, metavar="NAME",
                      help="a preset (h100-sxm, h200, a100-80gb, l4, rtx-4090, m2-ultra, m4-max, epyc-zen5-1t) "
                           "or local: measure this machine (the default)")
    plan.add_argument("--bandwidth", type=float, default=None, metavar="GB/s", help="memory bandwidth, with --flops")
    plan.add_argument("--flops", type=float, default=None, metavar="TFLOP/s", help="dense bf16 matmul rate, with --bandwidth")
    plan.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="prompt tokens per request (default 512)")
    plan.add_argument("--output-tokens", type=int, default=128, metavar="N", help="output tokens per request (default 128)")
    plan.add_argument("--latency", type=float, default=None, metavar="S",
                      help="target seconds per request: the most requests in flight that meet it (Little's law)")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--debug", action="store_true")

    pull = sub.add_parser("pull", help="fetch a known model into the cache")
    pull.add_argument("model", nargs="?", default=None)
    pull.add_argument("--debug", action="store_true")
    return parser


def _text_or_file(value: str, flag: str) -> str:
    """``@path`` reads the file; anything else is the text itself."""
    if not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise ChollaError(f"{flag}: cannot read {value[1:]} ({e.strerror})") from None


def _structured_outputs(args: argparse.Namespace):
    from cholla.sampling.params import StructuredOutputsParams

    if args.json_schema is not None:
        return StructuredOutputsParams(json=_text_or_file(args.json_schema, "--json-schema"))
    if args.grammar is not None:
        return StructuredOutputsParams(grammar=_text_or_file(args.grammar, "--grammar"))
    return StructuredOutputsParams(json_object=True) if args.json_object else None


def _sampling_params(args: argparse.Namespace):
    from cholla.sampling.params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        structured_outputs=_structured_outputs(args),
    )


def _flag_list(values: list[str] | None) -> list[str] | None:
    """Values given one by one, or as vLLM's JSON list (``'["http://a", "http://b"]'``)."""
    if values is None:
        return None
    flat = []
    for value in values:
        if value.lstrip().startswith("["):
            try:
                parsed = json.loads(value)
            except ValueError:
                raise ChollaError(f"{value!r} is not a JSON list; give the values one by one or as '[\"a\", \"b\"]'") from None
            flat += [str(v) for v in parsed]
        else:
            flat.append(value)
    return flat


def _engine_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"max_model_len": args.max_model_len, "dtype": args.dtype, "threads": args.threads,
              "kv_cache_dtype": args.kv_cache_dtype, "cache_type_k": args.cache_type_k, "cache_type_v": args.cache_type_v,
              "speculative_method": args.speculative_method, "num_speculative_tokens": args.num_speculative_tokens,
              "draft_model": args.draft_model, "speculative_ngram_cache_size": args.speculative_ngram_cache_size,
              "spec_tree_budget": args.spec_tree_budget, "spec_skip_layers": args.spec_skip_layers,
              "kv_offload_dir": args.kv_offload_dir, "kv_offload_gib": args.kv_offload_gib}
    if args.kv_cache_memory:
        kwargs["kv_cache_memory"] = int(args.kv_cache_memory * 2**30)
    return kwargs


def cmd_run(args: argparse.Namespace) -> int:
    from cholla.llm import LLM

    if len(args.args) > 2:
        raise ChollaError("give at most a model and one prompt (quote the prompt)")
    model, prompt = (None, args.args[0]) if len(args.args) == 1 else args.args
    params = _sampling_params(args)
    llm = LLM(model, **_engine_kwargs(args))
    if args.raw:
        prompt_input = prompt
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        prompt_input = {"prompt_token_ids": llm.encode_messages(messages)}

    start = time.perf_counter()
    first = last = None
    printed = 0
    out = None
    for out in llm.stream(prompt_input, params):
        now = time.perf_counter()
        first = first or now
        last = now
        if not args.json:
            sys.stdout.write(out.text[printed:])
            sys.stdout.flush()
            printed = len(out.text)
    prompt_ids = prompt_input["prompt_token_ids"] if isinstance(prompt_input, dict) else llm.tokenizer.encode(prompt)
    n_out = len(out.token_ids)
    prefill_s = (first - start) if first else 0.0
    decode_s = (last - first) if first else 0.0
    timings = {
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(len(prompt_ids) / prefill_s, 2) if prefill_s else None,
        "decode_s": round(decode_s, 4),
        "decode_tokens_per_s": round((n_out - 1) / decode_s, 2) if decode_s and n_out > 1 else None,
    }
    if args.json:
        print(json.dumps({
            "text": out.text,
            "token_ids": out.token_ids,
            "prompt_token_ids": prompt_ids,
            "finish_reason": out.finish_reason,
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": n_out, "total_tokens": len(prompt_ids) + n_out},
            "timings": timings,
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        rate = timings["decode_tokens_per_s"]
        print(
            f"[{len(prompt_ids)} prompt tokens at {timings['prefill_tokens_per_s'] or 0:.1f} t/s, "
            f"{n_out} generated at {rate or 0:.1f} t/s, finish: {out.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from cholla.chat import run_chat
    from cholla.llm import LLM

    params = _sampling_params(args)
    llm = LLM(args.model, **_engine_kwargs(args))
    if params.structured_outputs is not None:
        llm.engine.structured.compile(params.structured_outputs)  # a bad schema or grammar fails before the first turn
    return run_chat(llm, params, args.system)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cholla.download import DEFAULT_MODEL, resolve_model
    from cholla.engine.engine import EngineConfig, LLMEngine
    from cholla.serve.app import create_app
    from cholla.serve.context import ServerSettings

    if not args.debug:
        logging.getLogger("cholla").setLevel(logging.INFO)  # show the model load's progress
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=not args.no_prefix_caching, **_engine_kwargs(args))
    settings = ServerSettings(args.served_model_name or [args.model or DEFAULT_MODEL], args.api_key, args.max_queue,
                              _flag_list(args.allowed_origins), _flag_list(args.allowed_methods),
                              _flag_list(args.allowed_headers), args.allow_credentials,
                              limits=_request_limits(args), reasoning_parser=args.reasoning_parser,
                              max_stored_responses=args.max_stored_responses)
    failures: list[BaseException] = []

    def stop_on_load_error(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True

    app = create_app(settings, lambda: LLMEngine(resolve_model(args.model), config), stop_on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="debug" if args.debug else "info",
                                           timeout_graceful_shutdown=5))
    server.run()
    if failures:
        error = failures[0]
        raise error if isinstance(error, ChollaError) else ChollaError(f"loading the model failed: {error}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from cholla.download import resolve_model
    from cholla.info import format_info, model_info

    info = model_info(resolve_model(args.model))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cholla.bench import format_table, report_dict, run_bench
    from cholla.download import resolve_model

    report = run_bench(resolve_model(args.model), args.n_prompt, args.n_gen, args.repetitions, args.dtype, args.threads,
                       profile=args.profile, kv_cache_dtype=args.kv_cache_dtype,
                       speculative_method=args.speculative_method, num_speculative_tokens=args.num_speculative_tokens,
                       speculative_ngram_cache_size=args.speculative_ngram_cache_size, draft_model=args.draft_model,
                       spec_tree_budget=args.spec_tree_budget, spec_skip_layers=args.spec_skip_layers)
    print(json.dumps(report_dict(report)) if args.json else format_table(report))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from cholla.download import resolve_model
    from cholla.plan import (
        PlanRequest,
        format_plan,
        make_plan,
        read_model_facts,
        resolve_hardware,
        resolve_kv_types,
    )

    for name in ("context", "concurrency", "block_size", "prompt_tokens", "output_tokens", "max_num_seqs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ChollaError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("memory", "kv_cache_memory", "latency"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ChollaError(f"--{name.replace('_', '-')} must be positive")
    path = resolve_model(args.model)
    facts = read_model_facts(path)
    k_type, v_type = resolve_kv_types(args.kv_cache_dtype, args.cache_type_k, args.cache_type_v, args.dtype)
    hardware = resolve_hardware(args.hardware, args.bandwidth, args.flops, path, facts, args.prompt_tokens)
    request = PlanRequest(args.context, args.concurrency,
                          int(args.kv_cache_memory * 2**30) if args.kv_cache_memory else None,
                          int(args.memory * 2**30) if args.memory else None, args.block_size,
                          args.prompt_tokens, args.output_tokens, args.latency, args.max_num_seqs)
    plan = make_plan(facts, request, k_type, v_type, hardware)
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from cholla.download import resolve_model

    print(resolve_model(args.model))
    return 0


COMMANDS = {"run": cmd_run, "info": cmd_info, "pull": cmd_pull, "serve": cmd_serve, "chat": cmd_chat, "bench": cmd_bench,
            "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="cholla: %(message)s", stream=sys.stderr
    )
    try:
        return COMMANDS[args.command](args)
    except ChollaError as e:
        if args.debug:
            traceback.print_exc()
        print(f"cholla: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
