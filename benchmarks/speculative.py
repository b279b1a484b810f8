"""Speculative decoding (n-gram prompt lookup, token trees, a draft model, layer skipping) against cholla's plain
decode and llama.cpp's own speculative tools.

For each model, method, batch size and workload it decodes the same greedy chat
request (``--batch`` copies of it at once) with and without speculation (the
engines share one loaded model) and reports decode tokens/s (all sequences'
tokens from the first token to the last, so prefill is left out; mean ± sd over
``-r`` runs), the speed-up, the speed-up by the process's CPU time (steadier than the
wall clock on a machine shared with other work), each the median of the repetitions'
paired ratios (a repetition runs the engines one after the other, each first in its turn and
the order reversed every other time) with their range, and for speculation the acceptance rate (accepted /
proposed drafts) and the mean accepted length (tokens each verification step
yields, its own token included). It also checks that both produced the same tokens:
greedy requests, and sampled ones (``--temperatures``) too, since a seeded request's
speculative sampling gives plain decoding's very tokens.

``tree`` (``--spec-tree-budget``, default 8 nodes) verifies prompt lookup's alternatives as one
token tree; its acceptance is accepted / drafted nodes, so it reads lower than a chain's by
construction: compare the mean accepted length and the speed.

``--llama-cpp DIR`` (default ``/work/llamacpp/bin`` when it holds the binaries; ``--no-llama-cpp``:
none) adds llama.cpp's ``llama-lookup`` (prompt lookup, ``--spec-draft-n-max K``) and
``llama-speculative`` (a draft model: ``--draft-model``, default the model itself) at batch 1 on
the same prompt text (the chat template rendered; the token count is checked against cholla's),
``-n`` tokens, greedy, ``--ignore-eos``, one thread per physical core as cholla uses; their t/s is
what the tool prints for its decode ("decoded N tokens in ..."), beside cholla's plain and
speculative rows of the same model and workload.

The shared n-gram cache is off in the ``ngram`` and ``tree`` rows: every repetition asks the same
question, and the cache would draft each run from the one before. ``--cache`` adds an
``ngram+cache`` row, measured on such a repeat (the first run's answer asked again).

``layer_skip`` drafts with the model itself, some of its layers left out (``--spec-skip-layers``,
default: the engine's search at start). Its row is what a user gets: drafting is charged its cost
(``Speculator.draft_cost``), so where it cannot pay the engine decodes plainly and the row shows
no acceptance. ``--forced`` adds a ``layer_skip+forced`` row that drafts and verifies K tokens
every step whatever they cost (rows free, drafting free in the policy, not in time): its
acceptance and speed are what layer skipping itself achieves.

Workloads: ``copy`` (repeat a given passage of ~150 tokens), ``code`` (rename a function in
given code and reply with the full code), both copy-heavy; ``open`` (a story: nothing to copy).
Every request decodes ``-n`` tokens, past the model's end of answer if it ends sooner
(``--ignore-eos`` for llama.cpp's tools); ``--stop-at-eos`` ends each where the model ends its
answer (at most ``-n``), in cholla and in llama.cpp's tools alike. SmolLM2-135M-Instruct's
answers to ``copy`` and ``code`` are longer than 96 tokens and copy the given text (with the
rename) from their first token, so at ``-n 96`` both measure the same answer; ``--answers``
prints each workload's answer (the plain decode's) to check what was measured.
``--methods draft`` drafts with ``--draft-model`` (default: the model itself,
which accepts every draft: it measures the machinery's cost, not a gain).

    python benchmarks/speculative.py                      # both models, ngram, K=4, 3 runs
    python benchmarks/speculative.py --models smollm2 -k 8 -n 96 -r 1
    python benchmarks/speculative.py --models smollm2 --methods draft --batch 1 32 -r 1
    python benchmarks/speculative.py --models smollm2 -n 64 -r 2 --temperatures 0 0.7 --cache
    python benchmarks/speculative.py --models smollm2 --step-cost   # the table speculator.STEP_COST holds
    python benchmarks/speculative.py --models smollm2 --profile --workloads copy -k 12   # where a step's time goes
    python benchmarks/speculative.py --methods ngram tree --workloads copy open -n 96 -r 2
    python benchmarks/speculative.py --methods layer_skip --forced --workloads copy open -n 64 -r 2 --no-llama-cpp

A single stream's open-ended text drafts (next to) nothing, so its speed-up is ~1.00x and a
run-to-run spread of a few percent decides any verdict: measure it with many repetitions and
``--floor``, which runs a second plain engine in the same turns; its ratio to the first is
the noise this run can tell apart (the open-ended goal is 0.97x):

    python benchmarks/speculative.py --models smollm2 gemma3 --workloads open --batch 1 -k 12 -n 96 -r 15 --floor --no-llama-cpp

``--step-cost`` measures what decides how many drafts a step verifies: a plain decode
step's time by rows (``rows`` sequences decoding at once), relative to a one-row step,
as wall time and as the process's CPU time (the steadier of the two on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's cholla, not an installed one

from cholla.download import resolve_model
from cholla.engine.engine import EngineConfig, LLMEngine
from cholla.models.loader import load_model
from cholla.sampling.params import SamplingParams
from cholla.speculative.config import DEFAULT_NGRAM_CACHE_SIZE, DEFAULT_TREE_BUDGET
from cholla.threads import set_threads
from cholla.tokenizer.chat_template import ChatTemplate, encode_chat

LLAMA_CPP_BIN = Path("/work/llamacpp/bin")
LLAMA_TOOLS = ("llama-lookup", "llama-speculative")

# A passage longer than the measured window: SmolLM2-135M-Instruct's answer to `copy` is the
# passage (~150 tokens, of which the first 96 are a copy word for word), so 96 tokens and
# `--stop-at-eos` measure the same answer. (The earlier three-sentence paragraph ended at 56 tokens,
# and the rest of a 96-token run was a chat turn the model invented.)
PARAGRAPH = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the "
    "great lens, and wound the clockwork that turned the light. Ships passing the reef at night counted the "
    "flashes, three short and one long, and knew exactly where they were. In winter the storms came in from the "
    "west, and the spray reached the gallery windows a hundred feet above the rocks. On those nights he did not "
    "sleep at all: he sat by the lamp with a pot of tea, listening to the wind, and wrote in the logbook every hour. "
    "When spring returned, the supply boat brought flour, oil, letters from his sister, and a new book to read."
)
# Code SmolLM2 answers by copying it with the edit made (`thank` renamed; then a sentence of its own
# from ~96 tokens on). Asked to rename a variable in, add docstrings to or fix arithmetic code
# (mean/variance), it rewrote the functions instead (`sum(values) / len(values)`): docs/benchmarks.md.
CODE = '''def greet(name):
    message = "Hello, " + name + "!"
    print(message)
    return message


def farewell(name):
    message = "Goodbye, " + name + "."
    print(message)
    return message


def thank(name):
    message = "Thank you, " + name + "."
    print(message)
    return message
'''
WORKLOADS = {
    "copy": f"Repeat the following paragraph exactly, word for word.\n\n{PARAGRAPH}",
    "code": f"Rename the function `thank` to `thank_you` in this Python code. Reply with the full code.\n\n```python\n{CODE}```",
    "open": "Write a short story about a dragon who learns to bake bread.",
}


def decode(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams,
           batch: int) -> tuple[list[int], float, float]:
    """Generate ``batch`` copies of one request; returns the first one's tokens and decode tokens/s
    over all of them (first token to last), by the wall clock and by the process's CPU time."""
    for i in range(batch):
        engine.add_request(f"bench-{i}", {"prompt_token_ids": prompt_ids}, params)
    first = last = None
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter(), time.process_time()
            if out.outputs[0].token_ids and first is None:
                first = now
            last, tokens[out.request_id] = now, out.outputs[0].token_ids
    generated = sum(map(len, tokens.values())) - batch
    return tokens["bench-0"], generated / (last[0] - first[0]), generated / (last[1] - first[1])


def paired(rates: list[float], baseline: list[float]) -> list[float]:
    """Each repetition's rate against the baseline's in the same repetition (run next to it)."""
    return [rate / base for rate, base in zip(rates, baseline)]


STEP_ROWS = {"bfloat16": [1, 2, 3, 5, 6, 7, 9, 13, 17, 24, 32, 48, 64], "float32": [1, 2, 3, 4, 5, 6, 7, 8]}


def step_cost(loaded, dtype: str, steps: int = 12) -> None:
    """Median wall and CPU time of a decode step by rows, each relative to one row's."""
    engine = LLMEngine(loaded, EngineConfig(max_model_len=512, kv_cache_memory=128 * 2**20, max_num_seqs=64, dtype=dtype))
    print(f"\n{loaded.dtype} step cost by rows ({steps} steps each, median)\n")
    print("| rows | wall ms | CPU ms | wall cost | CPU cost |")
    print("|---|---|---|---|---|")
    first = None
    for rows in STEP_ROWS[loaded.dtype]:
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(rows):
            engine.add_request(f"rows{rows}-{i}", f"Count to {i}:", params)
        for _ in range(4):  # the prompts and the first decode steps
            engine.step()
        wall, cpu = [], []
        for _ in range(steps):
            w, c = time.perf_counter(), time.process_time()
            engine.step()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        while engine.has_unfinished_requests():
            engine.step()
        times = statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3
        first = first or times
        print(f"| {rows} | {times[0]:.2f} | {times[1]:.2f} | {times[0] / first[0]:.2f} | {times[1] / first[1]:.2f} |",
              flush=True)


def profile_steps(loaded, workload: str, k: int, max_tokens: int, ignore_eos: bool = True) -> None:
    """Where a greedy single stream's decode step spends its time, plain and with n-gram
    speculation (no shared cache): per step, the process's CPU time in the scheduler, the
    runner's input packing, the decoder layers (the fused C++ step), the output head, the
    sampler and the engine's postprocessing (the rest of the step is the engine's own glue)."""
    from collections import Counter

    from cholla.engine import runner as runner_module
    from cholla.models import fused_decode

    spent: dict[str, float] = {}
    wrapped: list[tuple[object, str, object]] = []  # put back at the end: a later call wraps afresh

    def timed(owner, attribute: str, key: str) -> None:
        function = getattr(owner, attribute)
        wrapped.append((owner, attribute, function))

        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] = spent.get(key, 0.0) + time.process_time() - start
        setattr(owner, attribute, wrapper)

    timed(fused_decode, "fused_layers", "layers (fused step)")
    timed(loaded.model, "compute_logits", "output head")
    timed(runner_module, "sample", "sampler")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    print(f"\n{loaded.dtype}, {workload}, {max_tokens} tokens{'' if ignore_eos else ' at most'}, K={k}: "
          "CPU ms per decode step\n")
    print("| run | steps | tokens/step | rows per step | step | scheduler | input packing | layers (fused step) | "
          "output head | sampler | postprocess | other |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, extra in (("plain", {}), ("ngram", {"speculative_method": "ngram", "num_speculative_tokens": k,
                                                   "speculative_ngram_cache_size": 0})):
        engine = LLMEngine(loaded, EngineConfig(max_model_len=2048, kv_cache_memory=256 * 2**20, max_num_seqs=1,
                                                dtype=loaded.dtype, **extra))
        prompt_ids = encode_chat(engine.tokenizer, ChatTemplate.for_tokenizer(engine.tokenizer),
                                 [{"role": "user", "content": WORKLOADS[workload]}])
        decode(engine, prompt_ids, params, 1)  # warm-up
        timed(engine.scheduler, "schedule", "scheduler")
        timed(engine.runner, "_prepare", "input packing")
        timed(engine, "_postprocess", "postprocess")
        rows = Counter()
        execute = engine.runner.execute
        engine.runner.execute = lambda batch: (rows.update([sum(batch.num_tokens)]), execute(batch))[1]
        engine.add_request("profile", {"prompt_token_ids": prompt_ids}, params)
        engine.step()  # the prompt
        spent.clear()
        rows.clear()
        steps, total, generated = 0, 0.0, 0
        while engine.has_unfinished_requests():
            start = time.process_time()
            outputs = engine.step()
            total += time.process_time() - start
            steps += 1
            generated = len(outputs[0].outputs[0].token_ids) if outputs else generated
        keys = ["scheduler", "input packing", "layers (fused step)", "output head", "sampler", "postprocess"]
        cells = [f"{1e3 * spent.get(key, 0.0) / steps:.2f}" for key in keys]
        other = total - sum(spent.get(key, 0.0) for key in keys)
        shape = ", ".join(f"{n}: {c}" for n, c in sorted(rows.items()))
        print(f"| {label} | {steps} | {(generated - 1) / steps:.2f} | {shape} | {1e3 * total / steps:.2f} | "
              + " | ".join(cells) + f" | {1e3 * other / steps:.2f} |", flush=True)
    for owner, attribute, function in reversed(wrapped):
        setattr(owner, attribute, function)


def llama_prompt_text(tokenizer, template: ChatTemplate, content: str) -> str:
    """The rendered chat prompt as llama.cpp's tools take it: they tokenize with the model's own
    BOS added, so a BOS the template wrote is left out (else they would see two)."""
    text = template.render([{"role": "user", "content": content}], True)
    bos = tokenizer.bos_token
    if tokenizer.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    return text


def run_llama_tool(binary: Path, model: Path, draft: Path, prompt: str, n: int, k: int, threads: int,
                   repetitions: int, ignore_eos: bool = True) -> tuple[list[float], float | None, float | None, int]:
    """One llama.cpp speculative tool ``repetitions`` times: (decode t/s per run, acceptance,
    mean accepted length (tokens per target pass), prompt tokens it counted)."""
    speeds, acceptance, length, n_input = [], None, None, 0
    # -p, not -f: a prompt file loses its final newline (common/arg.cpp), the chat template's last character.
    command = [str(binary), "-m", str(model), "-p", prompt, "-n", str(n), "-t", str(threads), "-tb", str(threads),
               "--temp", "0", "--spec-draft-n-max", str(k), "-c", "2048"] + (["--ignore-eos"] if ignore_eos else [])
    if binary.name == "llama-speculative":
        command += ["-md", str(draft), "-td", str(threads), "-tbd", str(threads)]
    for _ in range(repetitions):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
        log = done.stdout + done.stderr
        decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        if done.returncode or decoded is None:
            raise RuntimeError(f"{binary.name} failed ({done.returncode}):\n{log[-2000:]}")
        speeds.append(int(decoded[1]) / float(decoded[2]))
        counts = {key: int(value) for key, value in re.findall(r"(n_drafted|n_accept|n_predict)\s*=\s*(\d+)", log)}
        n_input = int(re.search(r"encoded\s+(\d+) tokens", log)[1])
        if counts.get("n_drafted"):
            acceptance = counts["n_accept"] / counts["n_drafted"]
            # Each target pass keeps its accepted drafts and one token of its own.
            passes = counts["n_predict"] - counts["n_accept"]
            length = counts["n_predict"] / passes if passes else None
    return speeds, acceptance, length, n_input


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--methods", nargs="+", choices=["ngram", "draft", "tree", "layer_skip"], default=["ngram"])
    parser.add_argument("--spec-skip-layers", default=None, help="with --methods layer_skip (default: searched at start)")
    parser.add_argument("--forced", action="store_true",
                        help="with layer_skip: also a row that drafts K tokens every step, whatever they cost")
    parser.add_argument("--spec-tree-budget", type=int, default=DEFAULT_TREE_BUDGET, help="with --methods tree")
    parser.add_argument("--draft-model", default=None, help="with --methods draft (default: the model itself)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], help="concurrent copies of each request")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("-n", "--max-tokens", type=int, default=128)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--answers", action="store_true", help="print each model's answer to each workload (plain decode)")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="end each request at the model's end of answer (at most -n tokens), not -n tokens past it")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.0],
                        help="sampled rows (> 0) use top_p=0.95 and seed 0")
    parser.add_argument("--cache", action="store_true", help="with ngram: also measure the shared n-gram cache on a repeat")
    parser.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP_BIN if LLAMA_CPP_BIN.is_dir() else None,
                        help="folder with llama-lookup and llama-speculative (benchmarks/build_llama_cpp.sh)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp's tools out")
    parser.add_argument("--floor", action="store_true",
                        help="also run a second plain engine in every repetition: its ratio to the first is the noise")
    parser.add_argument("--step-cost", action="store_true", help="measure a decode step's cost by rows instead")
    parser.add_argument("--profile", action="store_true",
                        help="split a single stream's decode step by where its CPU time goes, plain and ngram, instead")
    args = parser.parse_args()
    if args.profile:
        for name in args.models:
            loaded = load_model(resolve_model(name), args.dtype)
            for workload in args.workloads:
                profile_steps(loaded, workload, args.num_speculative_tokens, args.max_tokens, not args.stop_at_eos)
        return
    if args.step_cost:
        for name in args.models:
            step_cost(load_model(resolve_model(name), args.dtype), args.dtype)
        return
    llama_bin = None if args.no_llama_cpp else args.llama_cpp

    rows = []
    answers: dict[tuple[str, str], list[int]] = {}  # (model, workload) -> the (first) request's answer
    tokenizers = {}
    llama_rows: dict[tuple[str, str], list] = {}  # (model, workload) -> [(tool, t/s per run, acceptance, length)]
    for name in args.models:
        loaded = load_model(resolve_model(name), args.dtype)
        base = {"max_model_len": 2048, "kv_cache_memory": 256 * 2**20, "max_num_seqs": max(args.batch), "dtype": args.dtype}
        plain = LLMEngine(loaded, EngineConfig(**base))
        # --floor: a second plain engine in the same turns, whose ratio to the first is this run's noise
        floor = LLMEngine(loaded, EngineConfig(**base)) if args.floor else None
        tokenizers[name] = plain.tokenizer
        template = ChatTemplate.for_tokenizer(plain.tokenizer)
        labels = [m for method in args.methods for m in ([method, "ngram+cache"] if method == "ngram" and args.cache
                                                          else [method, "layer_skip+forced"]
                                                          if method == "layer_skip" and args.forced else [method])]
        if llama_bin is not None and 1 in args.batch and 0.0 in args.temperatures:
            tokenizer, template = plain.tokenizer, ChatTemplate.for_tokenizer(plain.tokenizer)
            threads = set_threads(None)
            draft_path = resolve_model(args.draft_model) if args.draft_model else loaded.path
            for tool in LLAMA_TOOLS:
                binary = llama_bin / tool
                if not (binary.is_file() and os.access(binary, os.X_OK)):
                    print(f"[speculative] no {binary}: run benchmarks/build_llama_cpp.sh", flush=True)
                    continue
                for workload in args.workloads:
                    prompt_ids = encode_chat(tokenizer, template, [{"role": "user", "content": WORKLOADS[workload]}])
                    speeds, acceptance, length, n_input = run_llama_tool(
                        binary, Path(loaded.path), Path(draft_path), llama_prompt_text(tokenizer, template, WORKLOADS[workload]),
                        args.max_tokens, args.num_speculative_tokens, threads, args.repetitions, not args.stop_at_eos)
                    if n_input != len(prompt_ids):
                        print(f"[speculative] {tool} {workload}: {n_input} prompt tokens, cholla {len(prompt_ids)}", flush=True)
                    llama_rows[(name, workload)] = llama_rows.get((name, workload), []) + [(tool, speeds, acceptance, length)]
                    print(f"[speculative] {name} {tool} {workload}: done", flush=True)
        for label in labels:
            method = label.split("+")[0]
            draft = (args.draft_model or loaded) if method == "draft" else None
            cache_size = DEFAULT_NGRAM_CACHE_SIZE if label == "ngram+cache" else 0
            for temperature in args.temperatures:
                params = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0, seed=0,
                                        max_tokens=args.max_tokens, ignore_eos=not args.stop_at_eos)
                for batch in args.batch:
                    for workload in args.workloads:
                        # A fresh engine per row: the shared cache holds only this row's first (warm-up) answer.
                        spec = LLMEngine(loaded, EngineConfig(**base, speculative_method=method, draft_model=draft,
                                                              num_speculative_tokens=args.num_speculative_tokens,
                                                              speculative_ngram_cache_size=cache_size,
                                                              spec_tree_budget=args.spec_tree_budget,
                                                              spec_skip_layers=args.spec_skip_layers
                                                              if method == "layer_skip" else None))
                        if label == "layer_skip+forced":  # every step drafts and verifies K tokens
                            spec.speculator.draft_cost = 0.0
                            spec.scheduler.config.step_cost = ((1, 1.0), (spec.scheduler.config.step_cost[-1][0], 1.0))
                        prompt_ids = encode_chat(plain.tokenizer, template, [{"role": "user", "content": WORKLOADS[workload]}])
                        order = [("plain", plain), ("spec", spec)] + ([("floor", floor)] if floor is not None else [])
                        for _, engine in order:  # warm-up (and the prefix cache) for each
                            decode(engine, prompt_ids, params, 1)
                        speeds: dict[str, list[float]] = {run: [] for run, _ in order}
                        cpu: dict[str, list[float]] = {run: [] for run, _ in order}
                        outputs = {}
                        before = spec.stats()
                        for rep in range(args.repetitions):
                            # Turns: each engine first in its turn, and the order reversed every other
                            # repetition, so a drift or a first-run advantage falls on no one side.
                            turn = order[rep % len(order):] + order[: rep % len(order)]
                            for run, engine in turn if rep % 2 == 0 else turn[::-1]:
                                outputs[run], rate, cpu_rate = decode(engine, prompt_ids, params, batch)
                                speeds[run].append(rate)
                                cpu[run].append(cpu_rate)
                        after = spec.stats()
                        drafts = after.spec_draft_tokens - before.spec_draft_tokens
                        accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
                        steps = after.spec_verifications - before.spec_verifications
                        answers[(name, workload)] = outputs["plain"]
                        rows.append((name, label, temperature, batch, workload, speeds["plain"], speeds["spec"],
                                     paired(cpu["spec"], cpu["plain"]),
                                     accepted / drafts if drafts else None, 1 + accepted / steps if steps else None,
                                     outputs["plain"] == outputs["spec"],
                                     paired(cpu["floor"], cpu["plain"]) if floor is not None else None))
                        print(f"[speculative] {name} {label} t={temperature:g} batch {batch} {workload}: done", flush=True)

    def spread(ratios: list[float]) -> str:
        """The median of the repetitions' paired ratios and their range."""
        return f"{statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    def fmt(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):7.1f} ± {sd:5.1f}"

    print(f"\n{args.max_tokens} tokens{' at most (to the end of answer)' if args.stop_at_eos else ''}, "
          f"K={args.num_speculative_tokens}, dtype={args.dtype}, "
          f"{args.repetitions} runs, t > 0: top_p 0.95 and seed 0, "
          f"draft model: {args.draft_model or 'the model itself'}\n")
    print("Speed-ups: the median over the repetitions of each one's speculative run against its plain run "
          "(range in brackets); CPU time: the process's, steadier than the wall clock on a shared machine."
          + (" Noise floor: a second plain engine in the same turns, against the first." if args.floor else "") + "\n")
    print("| model | method | temperature | batch | workload | plain t/s | speculative t/s | speed-up | "
          "speed-up (CPU time) | " + ("noise floor (CPU time) | " if args.floor else "")
          + "acceptance | mean accepted length | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if args.floor else ""))
    for name, method, temperature, batch, workload, plain_speeds, spec_speeds, cpu_ratios, acceptance, length, same, \
            floor_ratios in rows:
        acceptance, length = ("-", "-") if length is None else (f"{acceptance:.0%}", f"{length:.2f}")  # never speculated
        print(f"| {name} | {method} | {temperature:g} | {batch} | {workload} | {fmt(plain_speeds)} | {fmt(spec_speeds)} | "
              f"{spread(paired(spec_speeds, plain_speeds))} | {spread(cpu_ratios)} | "
              + (f"{spread(floor_ratios)} | " if args.floor else "")
              + f"{acceptance} | {length} | {'yes' if same else 'NO'} |")
    # llama.cpp's tools, against cholla's plain decode of the same model and prompt (greedy, batch 1).
    for (name, workload), tools in llama_rows.items():
        plain_speeds = [v for r in rows if (r[0], r[2], r[3], r[4]) == (name, 0.0, 1, workload) for v in r[5]]
        for tool, speeds, acceptance, length in tools:
            speedup = f"{statistics.mean(speeds) / statistics.mean(plain_speeds):.2f}x" if plain_speeds else "-"
            acceptance, length = ("-", "-") if length is None else (f"{acceptance:.0%}", f"{length:.2f}")
            print(f"| {name} | {tool} (llama.cpp) | 0 | 1 | {workload} | {fmt(plain_speeds) if plain_speeds else '-'} | "
                  f"{fmt(speeds)} | {speedup} | {acceptance} | {length} | - |")
    if args.stop_at_eos:
        print("\nTokens in each answer (the first request's, greedy's last row): "
              + ", ".join(f"{name} {workload} {len(answer)}" for (name, workload), answer in answers.items()))
    if args.answers:
        for (name, workload), answer in answers.items():
            print(f"\n{name}, {workload} ({len(answer)} tokens):\n{tokenizers[name].decode(answer)}")


if __name__ == "__main__":
    main()
