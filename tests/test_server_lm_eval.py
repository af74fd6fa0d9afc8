"""lm-eval (0.4.x) `local-completions` against `tda-export serve` (a real server process), offline: a loglikelihood task and a
generate_until task from JSON files on disk, with the engine's own tokenizer. The loglikelihood lm-eval reads
through the server must equal the engine's own (dense prefill of each prefix) within 1e-4."""
import json
import re
import subprocess
import sys
import threading
import time

import httpx

import numpy as np
import pytest

from tda_export.runtime.engine import Engine
from tda_export.runtime.generate import generate
from tda_export.runtime.sampling import SamplingParams, log_softmax

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"context": "The quick brown fox jumps over the", "choices": ["lazy dog", "quick fox", "question"], "answer": 0},
    {"context": "To be, or not to be, that is the", "choices": ["question", "lazy dog", "brown fox"], "answer": 0},
    {"context": "The lazy dog", "choices": ["jumps", "is", "to be"], "answer": 1},
    {"context": "or not", "choices": ["to be", "the fox"], "answer": 0},
]

LOGLIKELIHOOD_TASK = """
task: tda_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""

GENERATE_TASK = """
task: tda_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{choices[0]}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def served(served_engine_dir):
    """`tda-export serve --port 0` as a subprocess; the port comes from the line it prints."""
    engine = Engine.load(served_engine_dir, backend="onnxruntime", threads=1)
    proc = subprocess.Popen([sys.executable, "-m", "tda_export", "serve", "-e", str(served_engine_dir), "--port", "0",
                             "--backend", "onnxruntime", "--threads", "1"], stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stderr:
            if m := re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        assert port, f"tda-export serve did not start (exit {proc.poll()})"
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe drained
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        yield engine, port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def run_lm_eval(base_url: str, engine_dir, tmp_path, monkeypatch, tasks=("tda_tiny_choice", "tda_tiny_gen")) -> dict:
    """lm-eval's `local-completions` against `base_url` (…/v1/completions), offline, on the tasks of DOCS."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "choice.yaml").write_text(LOGLIKELIHOOD_TASK.format(data=data))
    (task_dir / "gen.yaml").write_text(GENERATE_TASK.format(data=data))
    model_args = (f"model=llama,base_url={base_url},"
                  f"tokenizer_backend=huggingface,tokenizer={engine_dir},batch_size=4,"
                  f"num_concurrent=1,max_retries=1,tokenized_requests=True")
    return simple_evaluate(model="local-completions", model_args=model_args, tasks=list(tasks),
                           task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                           log_samples=True, bootstrap_iters=0)


def loglikelihoods(out: dict) -> list[tuple[str, str, float]]:
    """(context, continuation, loglikelihood) of every choice lm-eval scored on tda_tiny_choice, in its order."""
    return [(*_args(args), resp[0][0]) for sample in out["samples"]["tda_tiny_choice"]
            for args, resp in zip(sample["arguments"], sample["resps"])]


def test_lm_eval_local_completions_loglikelihood_and_generate_until(served, served_engine_dir, tmp_path,
                                                                     monkeypatch):
    engine, port = served
    out = run_lm_eval(f"http://127.0.0.1:{port}/v1/completions", served_engine_dir, tmp_path, monkeypatch)
    assert 0.0 <= out["results"]["tda_tiny_choice"]["acc,none"] <= 1.0
    assert "exact_match,none" in out["results"]["tda_tiny_gen"]

    tok = engine.tokenizer
    scored = loglikelihoods(out)
    for context, continuation, ll in scored:
        assert abs(ll - _direct_loglikelihood(engine, tok, context, continuation)) < 1e-4
    assert len(scored) == sum(len(d["choices"]) for d in DOCS)

    for sample in out["samples"]["tda_tiny_gen"]:
        context = _args(sample["arguments"][0])[0]
        ids = tok(context, add_special_tokens=False).input_ids
        want = generate(engine, [ids], SamplingParams(max_new_tokens=6, stop=("\n\n", tok.eos_token)))[0]
        assert sample["resps"][0][0] == want


def _args(args):
    """(context, continuation) from a logged request, whichever shape this lm-eval version logs."""
    if isinstance(args, dict):
        return tuple(args[f"arg_{i}"] for i in range(len(args)))
    return tuple(args)


def _encode_pair(tok, context: str, continuation: str):
    """lm-eval's split: trailing spaces move to the continuation, the whole is encoded, then cut."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def _direct_loglikelihood(engine, tok, context, continuation) -> float:
    ctx, cont = _encode_pair(tok, context, continuation)
    prompt = ctx + cont
    total = 0.0
    for k in range(len(ctx), len(prompt)):
        logits, _ = engine.backend.prefill(np.array([prompt[:k]]), np.ones((1, k), np.int64), engine.thresholds())
        total += float(log_softmax(logits[0])[prompt[k]])
    return total
