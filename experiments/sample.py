"""Generate text from a trained workdir's latest checkpoint.

    python -m experiments.sample --workdir=DIR --prompt="The dictionary" [--max_new_tokens=64]
        [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0]
Temperature 0 is greedy decoding.
"""

from __future__ import annotations

from absl import flags

from experiments.cli import run

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train_lm.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", ["The"], "Prompt text; repeat the flag for a batch of prompts.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Keep the k most likely tokens; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass; 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv: list[str]) -> None:
    del argv
    import jax

    from lm_core.generation import SamplingConfig, generate_text
    from lm_core.trained_runs import load_trained_model

    model, tokenizer, step = load_trained_model(_WORKDIR.value)
    config = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    continuations = generate_text(model, tokenizer, _PROMPT.value, config, jax.random.key(_SEED.value))
    print(f"# checkpoint step {step}")
    for prompt, continuation in zip(_PROMPT.value, continuations, strict=True):
        print(prompt + continuation)
        print("-" * 40)


if __name__ == "__main__":
    run(main)
