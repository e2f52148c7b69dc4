"""Export a trained lm_core run as a Hugging Face model directory.

    python -m experiments.export_hf --workdir=DIR --out=HF_DIR [--dtype=bfloat16|float32] [--max_shard_gb=5]

Writes HF_DIR/config.json (LlamaConfig, or Qwen3Config when the model has QK-norm), model.safetensors (shards
model-0000i-of-0000n.safetensors plus model.safetensors.index.json above --max_shard_gb), generation_config.json
and the tokenizer (tokenizer.json / tokenizer.model + tokenizer_config.json), so that
    transformers.AutoModelForCausalLM.from_pretrained(HF_DIR) and transformers.AutoTokenizer.from_pretrained(HF_DIR)
load it with no custom code, compute our logits and encode as our tokenizer does. Our models scale the input
embedding by sqrt(d_model) and Llama does not, so a tied model becomes an untied HF one (embed_tokens = the scaled
table, lm_head = the table). A model with no HF equivalent (MoMa experts, Chameleon's swin norm, a KV-prediction
run) is refused in one line; so is an --out that exists and is not empty. Files are written into a temporary
directory renamed to HF_DIR at the end, so a failure leaves nothing half written.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from experiments.cli import run

_WORKDIR = flags.DEFINE_string("workdir", None, "An lm_core run (train_lm, import_hf, kv_prediction's base/...).",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "The Hugging Face model directory to write (new or empty).", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Stored dtype (default: the model's "
                           "param_dtype).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Split model.safetensors into shards of at most this "
                                   "many GB (as transformers' save_pretrained does at 5).")


def main(argv: list[str]) -> None:
    del argv
    from lm_core.errors import UserError
    from lm_core.hf_workdir import export_workdir

    if not _MAX_SHARD_GB.value > 0:
        raise UserError(f"--max_shard_gb={_MAX_SHARD_GB.value} must be a positive number of GB")
    files = export_workdir(Path(_WORKDIR.value), Path(_OUT.value), dtype=_DTYPE.value,
                           max_shard_bytes=int(_MAX_SHARD_GB.value * 10**9))
    print(f"wrote {_OUT.value}: {', '.join(files)} (+ tokenizer files)")


if __name__ == "__main__":
    run(main)
