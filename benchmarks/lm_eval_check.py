"""lm-evaluation-harness against ``cholla serve``: a multiple-choice task, scored two ways.

Starts ``python -m cholla serve MODEL --dtype float32``, writes a small multiple-choice
task (a JSONL and its task YAML) to a temporary folder, and runs lm-eval's
``local-completions`` model on it (remote tokenizer through ``/tokenizer_info`` and
``/tokenize``, loglikelihoods through ``/v1/completions`` with ``echo`` and ``logprobs``).
Then transformers, loading the same GGUF in float32, scores every (context,
continuation) pair lm-eval asked about, and the table shows how far apart the two
are per token (the target: within 1e-3) and the accuracy each gives.

    pip install lm-eval                       # not in the test extras: it pulls ~40 packages
    python benchmarks/lm_eval_check.py         # SmolLM2
    python benchmarks/lm_eval_check.py gemma3 --batch-size 4

``tests/test_serve_eval.py`` sends the same HTTP calls without lm-eval installed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

# (question, choices, index of the right one)
ITEMS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which planet is known as the red planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What do bees make?", ["milk", "silk", "honey", "wax paper"], 2),
    ("What is the largest ocean on Earth?", ["the Atlantic", "the Pacific", "the Indian", "the Arctic"], 1),
    ("What colour is the sky on a clear day?", ["green", "blue", "red", "black"], 1),
    ("How many days are in a week?", ["five", "six", "seven", "eight"], 2),
    ("What gas do plants take in from the air?", ["oxygen", "helium", "carbon dioxide", "neon"], 2),
    ("Which animal is known as the king of the jungle?", ["the lion", "the mouse", "the frog", "the owl"], 0),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Which is the closest star to the Earth?", ["the Sun", "Sirius", "Polaris", "Vega"], 0),
    ("What is two plus two?", ["three", "four", "five", "six"], 1),
]

TASK_YAML = """task: cholla_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "cholla", "serve", model, "--dtype", "float32", "--port", str(port),
               "--served-model-name", "cholla-eval", "--max-model-len", "1024"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}: {' '.join(command)}")
        time.sleep(0.5)
    server.terminate()
    raise SystemExit("the server did not become ready in 300 s")


@torch.inference_mode()
def transformers_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    logprobs = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    rows = torch.arange(len(context) - 1, len(ids) - 1)
    return float(logprobs[rows, torch.tensor(continuation)].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=8, help="requests lm-eval packs into one call")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    from cholla.download import resolve_model

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model(args.model)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.model, port)
    try:
        with tempfile.TemporaryDirectory() as folder:
            data = Path(folder) / "mc.jsonl"
            data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
            (Path(folder) / "cholla_mc.yaml").write_text(TASK_YAML.format(data=data))
            start = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model="local-completions",
                model_args={"base_url": f"{url}/v1/completions", "model": "cholla-eval", "tokenizer_backend": "remote",
                            "tokenized_requests": True, "max_retries": 1},
                tasks=["cholla_mc"], batch_size=args.batch_size, log_samples=True,
                task_manager=TaskManager(include_path=folder),
            )
            seconds = time.perf_counter() - start

        def encode(text: str) -> list[int]:  # as lm-eval's remote tokenizer does
            return httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

        samples = results["samples"]["cholla_mc"]
        scored = []  # per question: the target and per choice (loglikelihood, context ids, continuation ids)
        for sample in samples:
            choices = []
            for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
                context_ids = encode(context)  # lm-eval's own split of the pair into tokens
                choices.append((float(response[0][0]), context_ids, encode(context + continuation)[len(context_ids):]))
            scored.append((int(sample["target"]), choices))
    finally:
        server.terminate()
        server.wait(timeout=30)

    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    worst, right, pairs = 0.0, 0, 0
    for target, choices in scored:
        theirs = []
        for loglikelihood, context_ids, continuation_ids in choices:
            expected = transformers_loglikelihood(reference, context_ids, continuation_ids)
            worst = max(worst, abs(loglikelihood - expected) / len(continuation_ids))
            theirs.append(expected)
            pairs += 1
        right += max(range(len(theirs)), key=theirs.__getitem__) == target

    acc = results["results"]["cholla_mc"]["acc,none"]
    print(f"\n{path.name}, float32, lm-eval {lm_eval.__version__} local-completions (batch {args.batch_size}), "
          f"{torch.get_num_threads()} threads")
    print("| questions | loglikelihood requests | lm-eval time s | max abs diff per token vs transformers "
          "| acc (lm-eval on cholla) | acc (transformers) |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(scored)} | {pairs} | {seconds:.1f} | {worst:.2e} | {acc:.3f} | {right / len(scored):.3f} |")
    if worst > 1e-3:
        raise SystemExit(f"cholla and transformers differ by {worst:.2e} per token, more than 1e-3")


if __name__ == "__main__":
    main()
