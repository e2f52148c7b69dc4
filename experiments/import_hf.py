"""Import a local Hugging Face Llama / Mistral / Qwen3 checkpoint as an lm_core workdir.

    python -m experiments.import_hf --hf_dir=HF_DIR --workdir=DIR [--max_seq_len=N] [--param_dtype=float32]
        [--scan_layers] [--seq_len=128]

HF_DIR holds config.json, the safetensors weights (model.safetensors, or shards with model.safetensors.index.json;
bfloat16, float16 or float32) and the tokenizer (tokenizer.json and/or tokenizer.model, tokenizer_config.json).
Supported: Llama (incl. Llama 3.1 RoPE scaling), Mistral without a binding sliding window, Qwen3 (QK-norm); GQA,
tied or untied embeddings, any RMSNorm epsilon. Anything else (attention or MLP biases, another activation or RoPE
scaling type, a quantized checkpoint) is refused in one line naming the field, as are a missing shard or tensor,
a wrong shape, and a tokenizer with more ids than the embedding has rows.

DIR becomes an ordinary lm_core workdir: DIR/config.json and DIR/train_config.py (a train_lm config: the model
as imported, data.tokenizer=pretrained), DIR/tokenizer/, DIR/checkpoints/0 (the weights, a fresh optimizer state). Each
parameter is placed straight from the memory-mapped files onto every local device's shard (fsdp over all
devices), so the model is never materialised whole. Then, for example:
    python -m experiments.sample --workdir=DIR --prompt="The capital of France is" --temperature=0
    python -m experiments.train_lm --config=DIR/train_config.py --workdir=DIR --config.steps=N  (fine-tuning)
    python -m experiments.kv_prediction.train ... --config.kvp.variants="('c:DIR',)"
Written into a temporary directory renamed to DIR at the end; DIR must be new or empty.
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from experiments.cli import run

_HF_DIR = flags.DEFINE_string("hf_dir", None, "A local Hugging Face model directory.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The lm_core workdir to create (new or empty).", required=True)
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", None, "Longest sequence the model will see (default: "
                                    "config.json's max_position_embeddings).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"], "Stored parameter dtype "
                                 "(default: the checkpoint's; float16 is widened to float32).")
_SCAN_LAYERS = flags.DEFINE_bool("scan_layers", False, "Store the layers stacked (model.scan_layers).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "data.seq_len of the written training config.")


def main(argv: list[str]) -> None:
    del argv
    from lm_core.hf_workdir import import_checkpoint

    config = import_checkpoint(Path(_HF_DIR.value), Path(_WORKDIR.value), max_seq_len=_MAX_SEQ_LEN.value,
                               param_dtype=_PARAM_DTYPE.value, scan_layers=_SCAN_LAYERS.value, seq_len=_SEQ_LEN.value)
    print(f"wrote {_WORKDIR.value}: {config.num_layers} layers, d_model {config.d_model}, {config.num_heads} heads "
          f"({config.num_kv_heads} KV), vocab {config.vocab_size}, param_dtype {config.param_dtype}")


if __name__ == "__main__":
    run(main)
