"""experiments.lm_eval_harness: lm_eval's requests scored by hand, batching-independent, offline tasks, KVP path.

One tiny KV-prediction workdir per module (base: byte tokenizer, d_model 32, 2 layers, 20 steps on the builtin
corpus; KVP lp0.50 on top, 4 steps): DIR/base is an ordinary lm_core workdir and serves the plain-model tests.
"""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from experiments import lm_eval_harness as harness  # noqa: E402  (sets HF offline before lm_eval imports datasets)

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 64
LONG_CONTEXT = "A list is a mutable sequence of items that can be changed. " * 2  # > MAX_LEN bytes: truncated
REQUESTS = [("The keyword that starts a function definition in Python is", " def"), ("", "hello"),
            ("A list ", "is mutable"), (LONG_CONTEXT, " and more"), ("def f(x):", "\n    return")]


def tiny_kvp_config():
    from experiments.configs import kvp_tiny

    config = kvp_tiny.get_config("demo")
    config.data.update(source="builtin", tokenizer="byte", seq_len=MAX_LEN, global_batch_size=8,
                       whole_documents=False)
    config.model.update(vocab_size=260, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, d_ff=64,
                        max_seq_len=MAX_LEN, qk_norm=True)
    config.update(steps=20, log_every=10, eval_every=0, checkpoint_every=20, eval_batches=1)
    config.optimizer.update(warmup_steps=2, learning_rate=3e-3)
    config.kvp.update(variants=("lp0.50",), steps=4)
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """DIR/base and DIR/kvp_lp0.50 as experiments.kv_prediction.train writes them (its aux-only run skipped)."""
    from experiments.kv_prediction.pipeline import plan, save_config
    from lm_core.trainer import train_to_end

    directory = tmp_path_factory.mktemp("lm_eval") / "kvp"
    config = tiny_kvp_config()
    save_config(config, directory)
    for name, run_dir, stage, task in plan(config, directory):
        if not name.startswith("aux-only"):
            stage.eval_every = 0  # no evaluation pass: one compilation fewer per run
            train_to_end(stage, run_dir, task)  # lm_core.trainer.train underneath
    return directory


@pytest.fixture(scope="module")
def base_lm(workdir):
    return harness.LMCoreLM(workdir=str(workdir / "base"), batch_size=8)


def instances(kind, args_list):
    return [Instance(kind, {}, args, index) for index, args in enumerate(args_list)]


def hand_tokens(tokenizer, context, continuation):
    """lm_eval's split for a byte tokenizer: trailing context spaces move to the continuation; BOS first."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    prompt = [tokenizer.bos_id, *tokenizer.encode(stripped)]
    return prompt, tokenizer.encode(continuation)


@functools.partial(jax.jit, static_argnames="graphdef")
def _logits(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens).logits  # unpadded: every position is a real token, segment 1


def full_forward_log_probs(model, tokens):
    """log_softmax of the model's logits for tokens[:-1] at the targets tokens[1:], and whether each is the argmax."""
    logits = np.asarray(_logits(*nnx.split(model), np.asarray([tokens[:-1]], np.int32))[0], np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = np.asarray(tokens[1:])
    return log_probs[np.arange(len(targets)), targets], logits.argmax(-1) == targets


def hand_loglikelihood(model, tokenizer, context, continuation):
    prompt, cont = hand_tokens(tokenizer, context, continuation)
    tokens = (prompt + cont)[-(MAX_LEN + 1):]
    picked, greedy = full_forward_log_probs(model, tokens)
    return float(picked[-len(cont):].sum()), bool(greedy[-len(cont):].all())


def test_loglikelihood_is_the_full_forward_log_prob_and_batching_changes_nothing(workdir, base_lm):
    from lm_core.generation import SamplingConfig, generate

    model, tokenizer = base_lm.loaded.scorer.model, base_lm.loaded.tokenizer
    # a continuation that is the model's own greedy one (is_greedy must say True)
    prompt = [tokenizer.bos_id, *tokenizer.encode("The dictionary")]
    greedy_ids = generate(model, [prompt], SamplingConfig(max_new_tokens=3))[0]
    assert all(4 + 32 <= int(t) < 4 + 127 for t in greedy_ids), greedy_ids  # printable ASCII bytes
    requests = [*REQUESTS, ("The dictionary", tokenizer.decode(greedy_ids))]
    batched = base_lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    base_lm.batch_size = 1  # every request alone in its batch, at its own bucket width
    try:
        alone = base_lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    finally:
        base_lm.batch_size = 8
    for (context, continuation), (logprob, is_greedy), (logprob_1, is_greedy_1) in zip(requests, batched, alone,
                                                                                       strict=True):
        expected, expected_greedy = hand_loglikelihood(model, tokenizer, context, continuation)
        assert abs(logprob - expected) < 1e-4 and is_greedy == expected_greedy, (context, logprob, expected)
        assert abs(logprob - logprob_1) < 1e-4 and is_greedy == is_greedy_1
    assert batched[-1][1] and not all(g for _, g in batched)
    assert harness.fit_request(*hand_tokens(tokenizer, LONG_CONTEXT, " x"), MAX_LEN)[0][0] != tokenizer.bos_id


def test_loglikelihood_rolling_is_the_sum_over_windows_of_max_len(base_lm):
    model, tokenizer = base_lm.loaded.scorer.model, base_lm.loaded.tokenizer
    text = "The quick brown fox jumps over the lazy dog. " * 4  # 180 bytes: windows 64 + 64 + 52
    sequence = [tokenizer.bos_id, *tokenizer.encode(text)]  # token j of the text is sequence[j + 1]
    n, expected = len(sequence) - 1, 0.0
    for start in range(0, n, MAX_LEN):  # predict text[start:end], each window with as much context as fits
        end = min(start + MAX_LEN, n)
        window = sequence[max(0, end - MAX_LEN):end + 1]
        expected += float(full_forward_log_probs(model, window)[0][-(end - start):].sum())
    (result,) = base_lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    assert n > 2 * MAX_LEN and abs(result - expected) < 1e-3, (result, expected)


def expected_generations(generate_fn, tokenizer, max_new=12):
    """GENERATIONS' greedy continuations by a library generation function (one batch, left-padded to the longest
    prompt), cut at EOS and then at each request's until strings."""
    from lm_core.generation import SamplingConfig

    config = SamplingConfig(max_new_tokens=max_new, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    new = generate_fn([[tokenizer.bos_id, *tokenizer.encode(prompt)] for prompt, _ in GENERATIONS], config)
    return [harness.cut_text(tokenizer.decode(harness.first_eos_cut(row, tokenizer.eos_id)), kwargs["until"])
            for row, (_, kwargs) in zip(new, GENERATIONS, strict=True)]


GENERATIONS = [("The dictionary", {"until": [" ", "ee"], "max_gen_toks": 12}),
               ("A", {"until": ["zzz"], "max_gen_toks": 12}),
               ("def f(x):\n    return", {"until": ["\n", "e"], "max_gen_toks": 12, "do_sample": False})]


def test_generate_until_is_lm_core_greedy_generation_cut_at_until(base_lm):
    from lm_core.generation import generate

    model, tokenizer = base_lm.loaded.scorer.model, base_lm.loaded.tokenizer
    outputs = base_lm.generate_until(instances("generate_until", GENERATIONS))
    assert outputs == expected_generations(lambda prompts, config: generate(model, prompts, config), tokenizer)
    assert all(len(output) <= 12 for output in outputs)
    assert any(len(output) < 12 for output in outputs)  # the tiny model's greedy text does hit an until string
    assert harness.parse_gen_kwargs({"do_sample": True, "top_k": 20, "until": "\n"}) == harness.GenerationRequest(
        until=("\n",), max_gen_toks=256, temperature=1.0, top_k=20, top_p=1.0)
    assert harness.parse_gen_kwargs({"temperature": 0.7, "max_gen_toks": 5}).temperature == 0  # no do_sample: greedy


def test_simple_evaluate_runs_the_bundled_tasks_offline(workdir, base_lm):
    import lm_eval

    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    manager = harness.local_task_manager()
    results = lm_eval.simple_evaluate(model=base_lm, tasks=["lm_core_tiny_mc"], task_manager=manager,
                                      log_samples=False)
    questions = len((harness.TASKS_DIR / "lm_core_tiny_mc.jsonl").read_text().splitlines())
    mc = results["results"]["lm_core_tiny_mc"]
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
    assert results["n-samples"]["lm_core_tiny_mc"]["effective"] == questions == 60
    # lm_eval's registry: model="lm_core" with an argument string, the other two task kinds, --limit
    results = lm_eval.simple_evaluate(model="lm_core", model_args=f"workdir={workdir / 'base'},batch_size=4",
                                      tasks=["lm_core_tiny_ppl", "lm_core_tiny_gen"], task_manager=manager,
                                      limit=2, log_samples=False)
    assert results["results"]["lm_core_tiny_ppl"]["bits_per_byte,none"] > 0
    assert 0 <= results["results"]["lm_core_tiny_gen"]["exact_match,strip"] <= 1
    assert {task: n["effective"] for task, n in results["n-samples"].items()} == {"lm_core_tiny_ppl": 2,
                                                                                 "lm_core_tiny_gen": 2}


@functools.partial(jax.jit, static_argnames="graphdef")
def _kvp_logits(graphdef, params, prompt, rest):
    """Logits [1 + len(rest), vocab]: the aux reads prompt[:-1] and the predictor writes the base's cache for it,
    the base reads prompt[-1] on that cache, then `rest` (the continuation but its last token) on the cache with
    its own K,V appended. One unpadded row."""
    kvp = nnx.merge(graphdef, params)
    size = prompt.shape[1]
    positions, segments = jnp.arange(size)[None], jnp.ones_like(prompt)
    predicted = kvp.predict_kv(prompt[:, :-1], positions=positions[:, :-1], segment_ids=segments[:, :-1])
    cache = kvp.base.cache_from_kv(predicted, positions[:, :-1], segments[:, :-1], size + rest.shape[1])
    out = kvp.base(prompt[:, -1:], positions=positions[:, -1:], segment_ids=segments[:, -1:], cache=cache)
    if rest.shape[1] == 0:
        return out.logits[0]
    later = kvp.base(rest, positions=size + jnp.arange(rest.shape[1])[None], segment_ids=jnp.ones_like(rest),
                     cache=out.cache)
    return jnp.concatenate([out.logits[0], later.logits[0]])


def hand_kvp_loglikelihood(kvp, tokenizer, context, continuation):
    """The base's log-probs of the continuation on the cache the predictor wrote for the prompt."""
    prompt, cont = hand_tokens(tokenizer, context, continuation)
    logits = _kvp_logits(*nnx.split(kvp), np.asarray([prompt], np.int32), np.asarray([cont[:-1]], np.int32))
    log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
    return float(log_probs[np.arange(len(cont)), cont].sum())


def test_kvp_scores_the_continuation_with_the_base_on_the_predicted_cache(workdir, base_lm):
    from kv_prediction.serving import KVPPath, generate

    kvp_lm = harness.LMCoreLM(workdir=str(workdir), kvp="lp0.50", batch_size=4)
    kvp, tokenizer = kvp_lm.loaded.scorer.model, kvp_lm.loaded.tokenizer
    requests = [REQUESTS[0], REQUESTS[2], REQUESTS[4]]  # contexts of 59, 6 and 9 bytes, none truncated
    results = kvp_lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    base_alone = base_lm.loglikelihood(instances("loglikelihood", requests), disable_tqdm=True)
    for (context, continuation), (logprob, _), (base_logprob, _) in zip(requests, results, base_alone, strict=True):
        expected = hand_kvp_loglikelihood(kvp, tokenizer, context, continuation)
        assert abs(logprob - expected) < 1e-4, (context, logprob, expected)
        assert abs(logprob - base_logprob) > 1e-3, context  # the predicted cache is not the base's own
    outputs = kvp_lm.generate_until(instances("generate_until", GENERATIONS))
    assert outputs == expected_generations(lambda prompts, config: generate(KVPPath(kvp), prompts, config), tokenizer)


def entrypoint(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-m", "experiments.lm_eval_harness", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_entrypoint_writes_results_and_refuses_bad_input_in_one_line(workdir, tmp_path):
    empty = tmp_path / "untrained"
    empty.mkdir()
    (empty / "config.json").write_text((workdir / "base" / "config.json").read_text())
    output = tmp_path / "out" / "results.json"
    good = entrypoint(f"--workdir={workdir / 'base'}", "--tasks=lm_core_tiny_mc,lm_core_tiny_ppl", "--limit=4",
                      "--batch_size=4", f"--output={output}")
    refused = [(entrypoint(f"--workdir={workdir / 'base'}", "--tasks=lm_core_tiny_mc,nope"),
                "unknown task nope; valid: lm_core_tiny_gen, lm_core_tiny_mc, lm_core_tiny_ppl"),
               (entrypoint(f"--workdir={empty}"), "has no checkpoints/"),
               (entrypoint(f"--workdir={workdir}", "--kvp=c99x9"), "valid: lp0.50")]
    for process, fragment in refused:
        _, stderr = process.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert process.returncode == 2 and len(lines) == 1 and fragment in lines[0], stderr[-2000:]
    assert sorted(path.name for path in empty.iterdir()) == ["config.json"]  # nothing created in a refused workdir
    stdout, stderr = good.communicate(timeout=300)
    assert good.returncode == 0, stderr[-3000:]
    saved = json.loads(output.read_text())
    assert saved["checkpoint_step"] == 20 and saved["kvp"] is None and saved["max_length"] == MAX_LEN
    assert set(saved["results"]) == {"lm_core_tiny_mc", "lm_core_tiny_ppl"}
    assert all(n["effective"] == 4 for n in saved["n_samples"].values())
    assert "lm_core_tiny_mc      acc" in stdout and not list(output.parent.glob(".*tmp*"))


def test_in_process_refusals_name_what_is_valid(workdir):
    from lm_core.errors import UserError

    for kwargs, fragment in [(dict(workdir=str(workdir)), "pass kvp=<spec> (trained: lp0.50)"),
                             (dict(workdir=str(workdir / "base"), kvp="lp0.50"), "has no kvp_config.json"),
                             (dict(workdir=str(workdir / "base"), batch_size="auto"), "batch_size='auto'")]:
        with pytest.raises(UserError, match=re.escape(fragment)):
            harness.LMCoreLM(**kwargs)
    with pytest.raises(UserError, match=re.escape("max_length=65 is invalid; valid: 2..64")):
        harness.context_length(MAX_LEN + 1, MAX_LEN)
    assert harness.context_length(None, MAX_LEN) == MAX_LEN and harness.context_length("32", MAX_LEN) == 32
    assert [harness.bucket_length(n, 64) for n in (1, 3, 17, 33, 63, 64)] == [1, 4, 32, 64, 64, 64]
    assert harness.generation_budget(10, 256, 64) == 54 and harness.generation_budget(60, 256, 64) == 32
    assert harness.cut_text("ab. cd\nef", ["\n", "."]) == "ab"


def test_the_output_layer_in_chunks_gives_the_same_scores(base_lm, monkeypatch):
    graphdef, params = nnx.split(base_lm.loaded.scorer.model)
    tokens = np.random.default_rng(0).integers(4, 200, (2, 40)).astype(np.int32)
    logits = np.asarray(_logits(graphdef, params, tokens), np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    monkeypatch.setattr(harness, "LOGIT_CHUNK_TOKENS", 24)  # read when traced: 2 rows x 12 positions per chunk
    positions = np.broadcast_to(np.arange(40, dtype=np.int32), (2, 40))
    picked, greedy = harness._full_forward_scores(graphdef, params, tokens, positions, np.ones_like(tokens), tokens)
    np.testing.assert_allclose(picked, np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0], atol=1e-4)
    assert (np.asarray(greedy) == (logits.argmax(-1) == tokens)).all()
