"""Hugging Face interop against `transformers` itself (CPU torch): export -> HF logits equal ours, HF -> import ->
our logits equal HF's, greedy generations identical, round trips bit-identical, bad input refused in one line
with nothing half written. Every convention bridged in lm_core.hf_convert (head layouts, sqrt(d) input scaling,
tied/untied, QK-norm, GQA, Llama 3.1 RoPE scaling) is exercised by at least one case here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from lm_core.config import ModelConfig
from lm_core.errors import UserError
from lm_core.generation import SamplingConfig, generate
from lm_core.hf_workdir import export_workdir, import_checkpoint, unrolled_params, write_hf_model
from lm_core.model import Transformer
from lm_core.safetensors_io import INDEX_FILE, CheckpointTensors
from lm_core.trained_runs import load_trained_model

VOCAB = 97
SPECIAL = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
CASES = {
    "mha_tied_scaled": {},
    "gqa_untied": {"num_kv_heads": 2, "tie_embeddings": False},
    "qk_norm_qwen3": {"qk_norm": True, "num_kv_heads": 2},
    "tied_unscaled": {"scale_embeddings": False},
    "llama3_rope": {"rope_scaling": "llama3", "rope_original_max_len": 16, "rope_scaling_factor": 4.0,
                    "rope_theta": 500.0},
}


def small_config(**changes) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, max_seq_len=64), **changes})


def random_model(config: ModelConfig, seed: int = 1) -> Transformer:
    """A random model whose norm scales are not all ones (so a misplaced norm weight changes the logits)."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    flat = []
    for index, (path, variable) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        if path[-1] == "scale":
            noise = 0.2 * jax.random.normal(jax.random.key(index), variable.get_value().shape)
            variable = variable.replace(variable.get_value() + noise)
        flat.append((path, variable))
    nnx.update(model, nnx.from_flat_state(flat))
    return model


def tokens(batch: int = 2, seq: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, VOCAB, (batch, seq)).astype(np.int32)


def hf_logits(hf_model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_exported_model_computes_our_logits_in_transformers(case, tmp_path):
    model = random_model(small_config(**CASES[case]))
    write_hf_model(model, tmp_path, dtype="float32", special_ids=SPECIAL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if model.config.qk_norm else "LlamaForCausalLM")
    ids = tokens()
    np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(model(jnp.asarray(ids)).logits), atol=1e-4)


def test_llama3_rope_scaling_changes_the_function():
    # So the llama3 case above cannot pass by ignoring the scaling on both sides.
    scaled = random_model(small_config(**CASES["llama3_rope"]))
    plain = random_model(small_config(rope_theta=500.0))
    ids = jnp.asarray(tokens())
    assert np.abs(np.asarray(scaled(ids).logits) - np.asarray(plain(ids).logits)).max() > 1e-3


def test_greedy_generation_is_identical_to_transformers(tmp_path):
    model = random_model(small_config(num_kv_heads=2, tie_embeddings=False))
    write_hf_model(model, tmp_path, dtype="float32", special_ids=SPECIAL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    prompt = tokens(batch=1, seq=7)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    ours = generate(model, [prompt[0].tolist()], SamplingConfig(max_new_tokens=12, temperature=0.0),
                    jax.random.key(0))
    assert np.asarray(ours).reshape(-1).tolist() == theirs


def test_bfloat16_export_loads_as_bfloat16(tmp_path):
    model = random_model(small_config())
    write_hf_model(model, tmp_path, dtype="bfloat16", special_ids=SPECIAL)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(hf.parameters()).dtype == torch.bfloat16
    ids = tokens()
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    assert np.abs(hf_logits(hf.float(), ids) - ours).max() < 0.1  # bf16 weights: close, not equal


def test_sharded_export_writes_an_index_transformers_loads(tmp_path):
    model = random_model(small_config(tie_embeddings=False))
    files = write_hf_model(model, tmp_path, dtype="float32", special_ids=SPECIAL, max_shard_bytes=40_000)
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and INDEX_FILE in files
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = tokens()
    np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(model(jnp.asarray(ids)).logits), atol=1e-4)


# --- import ---------------------------------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "and", "then", "slept", ".", ","]
HF_FAMILIES = {
    "llama_gqa_untied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama31_rope": (transformers.LlamaConfig, dict(rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}, rope_theta=500.0, tie_word_embeddings=False)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=None,
                                                 tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
}


def write_word_tokenizer(directory: Path, extra_words: int = 0) -> None:
    """A tokenizer.json (word level) whose EOS sits at the END of the ids, not at 3, and which has no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = WORDS + [f"w{i}" for i in range(extra_words)]
    vocab = {"<unk>": 0, **{word: i + 1 for i, word in enumerate(words)}, "<|endoftext|>": len(words) + 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}))


def hf_checkpoint(directory: Path, family: str, dtype: torch.dtype = torch.float32, layers: int = 2,
                  **save_kwargs) -> torch.nn.Module:
    """A random-init HF model of `family` saved (safetensors) with a tokenizer in `directory`."""
    config_class, changes = HF_FAMILIES[family]
    config = config_class(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                    num_attention_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5,
                                    eos_token_id=len(WORDS) + 1, bos_token_id=None, pad_token_id=None), **changes})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    model.save_pretrained(directory, **save_kwargs)
    write_word_tokenizer(directory)
    return model


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_imported_model_computes_the_hf_logits(family, tmp_path):
    hf = hf_checkpoint(tmp_path / "hf", family)
    import_checkpoint(tmp_path / "hf", tmp_path / "run")
    model, tokenizer, step = load_trained_model(tmp_path / "run")
    assert step == 0 and tokenizer.eos_id == len(WORDS) + 1 and tokenizer.bos_id == tokenizer.eos_id
    assert model.config.rope_scaling == ("llama3" if family == "llama31_rope" else "none")
    ids = tokens()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids)).logits), hf_logits(hf, ids), atol=1e-4)


def test_import_reads_every_parameter_block_by_block(tmp_path, monkeypatch):
    # The point of the import: each device's shard is read on its own, none of the big tensors whole.
    hf_checkpoint(tmp_path / "hf", "llama_gqa_untied")
    requested = []
    original = jax.make_array_from_callback

    def spy(shape, sharding, callback):
        requested.append((shape, len(sharding.device_set), sharding.is_fully_replicated))
        return original(shape, sharding, callback)

    monkeypatch.setattr(jax, "make_array_from_callback", spy)
    import_checkpoint(tmp_path / "hf", tmp_path / "run")
    assert len(jax.devices()) == 8 and all(devices == 8 for _, devices, _ in requested)
    embedding = [replicated for shape, _, replicated in requested if shape == (VOCAB, 32)]
    assert embedding == [False]  # sharded over the 8 devices, so no callback reads the table whole


def test_bfloat16_checkpoint_imports_bit_exactly_and_scan_layers_agrees(tmp_path):
    hf = hf_checkpoint(tmp_path / "hf", "llama_gqa_untied", dtype=torch.bfloat16)
    import_checkpoint(tmp_path / "hf", tmp_path / "run")
    import_checkpoint(tmp_path / "hf", tmp_path / "scanned", scan_layers=True)
    model, _, _ = load_trained_model(tmp_path / "run")
    assert model.config.param_dtype == "bfloat16"
    ours = np.asarray(model.block(1).ffn.gate[...]).astype(np.float32)
    theirs = hf.model.layers[1].mlp.gate_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(ours, theirs)
    scanned, _, _ = load_trained_model(tmp_path / "scanned")
    assert scanned.config.scan_layers
    stacked, unrolled = unrolled_params(scanned), unrolled_params(model)  # the same bits, stacked or not
    assert stacked.keys() == unrolled.keys()
    for path, value in unrolled.items():
        assert stacked[path].tobytes() == value.tobytes(), path


def test_hf_import_then_export_gives_back_the_same_tensors(tmp_path):
    hf_checkpoint(tmp_path / "hf", "qwen3", max_shard_size="40KB")
    assert (tmp_path / "hf" / INDEX_FILE).is_file()  # a sharded checkpoint goes in
    import_checkpoint(tmp_path / "hf", tmp_path / "run")
    export_workdir(tmp_path / "run", tmp_path / "out")
    before, after = CheckpointTensors(tmp_path / "hf"), CheckpointTensors(tmp_path / "out")
    assert sorted(before.names()) == sorted(after.names())
    for name in before.names():
        assert before.tensor(name).tobytes() == after.tensor(name).tobytes(), name
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    original = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the cat sat on the mat , and then the dog ran far ."
    assert hf_tok.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)


def test_our_export_then_import_keeps_every_weight(tmp_path):
    model = random_model(small_config(num_kv_heads=2))  # tied, inputs scaled by sqrt(d)
    (tmp_path / "hf").mkdir()
    write_hf_model(model, tmp_path / "hf", dtype="float32", special_ids={"eos_token_id": len(WORDS) + 1})
    write_word_tokenizer(tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "run")
    imported, _, _ = load_trained_model(tmp_path / "run")
    assert not imported.config.scale_embeddings and not imported.config.tie_embeddings
    mine, theirs = unrolled_params(model), unrolled_params(imported)
    table = mine.pop(("embedding", "table"))
    np.testing.assert_array_equal(theirs.pop(("output",)), table.T)  # the tied table is the output layer
    np.testing.assert_array_equal(theirs.pop(("embedding", "table")), table * np.float32(np.sqrt(32)))
    assert mine.keys() == theirs.keys()
    for path in mine:
        np.testing.assert_array_equal(mine[path], theirs[path], err_msg=str(path))
    ids = jnp.asarray(tokens())
    np.testing.assert_allclose(np.asarray(imported(ids).logits), np.asarray(model(ids).logits), atol=1e-4)


def test_imported_workdir_trains_on_and_samples(tmp_path):
    from lm_core.trainer import train

    hf_checkpoint(tmp_path / "hf", "llama_tied")
    import_checkpoint(tmp_path / "hf", tmp_path / "run", seq_len=32)
    namespace: dict = {}
    exec((tmp_path / "run" / "train_config.py").read_text(), namespace)
    config = namespace["get_config"]()
    config.steps, config.data.global_batch_size, config.eval_every, config.checkpoint_every = 2, 8, 2, 2
    result = train(config, tmp_path / "run")
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    sample = subprocess.run([sys.executable, "-m", "experiments.sample", f"--workdir={tmp_path / 'run'}",
                             "--prompt=the cat", "--max_new_tokens=4", "--temperature=0"],
                            capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert "# checkpoint step 2" in sample.stdout
    compiled = subprocess.run([sys.executable, "-m", "experiments.compile_check",
                               f"--config={tmp_path / 'run' / 'train_config.py'}", "--topology=cpu:8", "--json"],
                              capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stderr
    assert json.loads(compiled.stdout)["results"][0]["fits"]


@pytest.mark.slow
def test_imported_models_are_a_kvp_base_and_a_canonical_auxiliary(tmp_path):
    # The use case the import exists for: KV prediction on a pretrained base (kvp.base) with a pretrained
    # auxiliary (c:DIR), both read through the base's own tokenizer.
    hf_checkpoint(tmp_path / "hf_base", "llama_gqa_untied", layers=4)
    import_checkpoint(tmp_path / "hf_base", tmp_path / "base")
    hf_checkpoint(tmp_path / "hf_aux", "llama_gqa_untied", layers=1)
    import_checkpoint(tmp_path / "hf_aux", tmp_path / "aux")
    text = " ".join(WORDS * 40)
    (tmp_path / "corpus").mkdir()
    for i in range(6):
        (tmp_path / "corpus" / f"{i}.txt").write_text(text)
    flags = [f"--config.kvp.base={tmp_path / 'base'}", f"--config.kvp.variants=('lp0.50','c:{tmp_path / 'aux'}')",
             f"--config.data.source=files:{tmp_path / 'corpus'}/*.txt", "--config.data.seq_len=32",
             "--config.data.global_batch_size=8", "--config.kvp.steps=2", "--config.kvp.pretrain_canonical=False",
             "--config.log_every=1", "--config.kvp.eval_documents=2", "--config.kvp.prompt_tokens=16",
             "--config.kvp.continuation_tokens=8", "--config.kvp.ttft_prompt_len=16", "--config.kvp.ttft_repeats=1",
             "--config.kvp.eval_questions=2", "--config.kvp.answer_tokens=3"]
    workdir = tmp_path / "kvp"
    trained = subprocess.run([sys.executable, "-m", "experiments.kv_prediction.train", f"--workdir={workdir}",
                              *flags], capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (workdir / "base").resolve() == (tmp_path / "base").resolve() and "run 1 of 4: KVP lp0.50" in trained.stdout
    saved = json.loads((workdir / "kvp_config.json").read_text())
    assert saved["model"]["num_layers"] == 4 and saved["data"]["tokenizer"] == "pretrained"
    for run in ("kvp_lp0.50", "aux_lp0.50", "kvp_c-aux", "aux_c-aux"):
        assert (workdir / run / "tokenizer" / "tokenizer.json").read_bytes() == (
            tmp_path / "base" / "tokenizer" / "tokenizer.json").read_bytes(), run
    model, tokenizer, step = load_trained_model(workdir / "base")
    assert step == 0  # the base was not retrained


# --- bad input ------------------------------------------------------------------------------------------------


def _refused(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_bad_checkpoints_are_refused_in_one_line_and_nothing_is_written(tmp_path):
    hf = tmp_path / "hf"
    hf_checkpoint(hf, "llama_gqa_untied", max_shard_size="40KB")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "moved")
    error = _refused(["experiments.import_hf", f"--hf_dir={hf}", f"--workdir={tmp_path / 'run'}"])
    assert shard.name in error
    (tmp_path / "moved").rename(shard)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    assert "attention_bias" in _refused(["experiments.import_hf", f"--hf_dir={hf}", f"--workdir={tmp_path / 'run'}"])
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(UserError, match="mlp.gate_proj.weight has shape"):
        import_checkpoint(hf, tmp_path / "run")
    (hf / "config.json").write_text(json.dumps(config))
    write_word_tokenizer(hf, extra_words=VOCAB)
    with pytest.raises(UserError, match=f"tokenizer .* has {VOCAB + 16} ids but the embedding has {VOCAB} rows"):
        import_checkpoint(hf, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


def test_unexportable_runs_and_used_outputs_are_refused(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "kvp_config.json").write_text("{}")
    assert "export one of its plain LM runs" in _refused(
        ["experiments.export_hf", f"--workdir={tmp_path / 'pipeline'}", f"--out={tmp_path / 'out'}"])
    with pytest.raises(UserError, match="norm_placement='swin'"):
        write_hf_model(random_model(small_config(norm_placement="swin")), tmp_path, dtype="float32",
                       special_ids=SPECIAL)
    hf_checkpoint(tmp_path / "hf", "llama_tied")
    import_checkpoint(tmp_path / "hf", tmp_path / "run")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        export_workdir(tmp_path / "run", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
