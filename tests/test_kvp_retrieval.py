"""The retrieval accuracy task and the serving-path scoring of kv_prediction's evaluation."""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from kv_prediction import retrieval
from kv_prediction.model import KVPModel
from kv_prediction.scoring import exact_match_rate, greedy_answers
from kv_prediction.serving import GivenKVPath, KVPPath, NullCachePath, PlainPath, continuation_nll
from kv_prediction.synthetic import Example, exact_match
from lm_core.config import ModelConfig
from lm_core.data import get_text_source
from lm_core.errors import UserError
from lm_core.generation import generate
from lm_core.model import Transformer
from lm_core.tokenizer import ByteTokenizer

CORPUS = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau",
          "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"]


def test_documents_state_facts_of_one_category_and_recall_each():
    options = retrieval.RetrievalOptions(facts=3, filler_chars=40)
    document = retrieval.retrieval_document(options, "train", 7, CORPUS)
    category = re.match(r"Each person's (\w+)\.", document).group(1)
    recalls = re.findall(r"Recall: (\w+) (\w+)\.", document)
    assert len(recalls) == 3 and len({person for person, _ in recalls}) == 3  # different people
    assert len({value for _, value in recalls}) == 3  # different values of the one category
    for person, value in recalls:
        assert value in retrieval.CATEGORIES[category] and person in retrieval.PEOPLE
        assert document.index(f"{person} {value}.") < document.index("Recall:")  # stated before recalled
    assert document == retrieval.retrieval_document(options, "train", 7, CORPUS)  # a pure function of its inputs
    assert document != retrieval.retrieval_document(options, "validation", 7, CORPUS)


def test_the_example_is_the_document_up_to_its_first_recalled_value():
    document = retrieval.retrieval_document(retrieval.RetrievalOptions(facts=2), "validation", 0, CORPUS)
    example = retrieval.as_example(document)
    assert document.startswith(example.prompt) and document[len(example.prompt):].startswith(f" {example.answer}.\n")
    assert example.prompt.count("Recall:") == 1  # no earlier recall gives the answer away by elimination
    person = example.prompt.splitlines()[-1].removeprefix("Recall: ")
    assert f"{person} {example.answer}." in example.prompt  # the answer is in the prompt, after that person
    other_values = [v for p, v in re.findall(r"(\w+) (\w+)\.", example.prompt.splitlines()[0])
                    if p in retrieval.PEOPLE and p != person]
    assert other_values and example.answer not in other_values  # the other fact is a different value


@pytest.mark.parametrize("generated, expected", [(" horse\nQuestion", True), (" horse. The", True), ("horse", True),
                                                 (" horses", False), (" house", False), ("\nhorse", False)])
def test_exact_match_cuts_at_newline_period_or_comma(generated, expected):
    assert exact_match(generated, "horse") is expected


def test_spec_options_and_bad_options():
    options, inner = retrieval.parse_spec("share=0.25,facts=2:files:/data/*.txt")
    assert options == retrieval.RetrievalOptions(share=0.25, facts=2) and inner == "files:/data/*.txt"
    assert retrieval.parse_spec("builtin") == (retrieval.RetrievalOptions(), "builtin")
    for argument, fragment in [("shares=0.5:builtin", "unknown"), ("share=1.5:builtin", "share=1.5"),
                               ("facts=0:builtin", "facts=0"), ("facts=11:builtin", "facts=11"),
                               ("facts=x:builtin", "facts=x"), ("", "names no")]:
        with pytest.raises(UserError, match=fragment):
            retrieval.parse_spec(argument)


def test_mixed_source_adds_the_requested_share(tmp_path):
    for index in range(20):
        (tmp_path / f"doc{index:02d}.txt").write_text(" ".join(CORPUS) * 3)
    source = get_text_source(f"retrieval:share=0.5,facts=2:files:{tmp_path}/*.txt")
    train = source.split("train")
    corpus = get_text_source(f"files:{tmp_path}/*.txt").split("train")
    added = [train[i] for i in range(len(corpus), len(train))]
    assert added and all("Recall: " in text for text in added)
    share = sum(map(len, added)) / (sum(map(len, added)) + sum(len(corpus[i]) for i in range(len(corpus))))
    assert 0.35 < share < 0.65
    assert train[len(train) - 1] == train[-1] and len(train[0:3]) == 3


def test_held_out_examples_use_validation_filler_and_seed():
    validation = ["held out text " * 20]
    examples = retrieval.retrieval_examples(retrieval.RetrievalOptions(facts=2, filler_chars=30), validation, 5)
    assert len({e.prompt for e in examples}) == 5 and sum("held out" in e.prompt for e in examples) >= 3


# --- scoring through the serving paths ---------------------------------------------------------------------------

CONFIG = ModelConfig(vocab_size=264, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                     max_seq_len=64, qk_norm=True)


@pytest.fixture(scope="module")
def base():
    return Transformer(CONFIG, rngs=nnx.Rngs(5))


def windows(rows: int = 3, width: int = 20) -> np.ndarray:
    tokens = np.random.default_rng(0).integers(4, CONFIG.vocab_size, (rows, width)).astype(np.int32)
    tokens[:, 0] = 1  # BOS
    return tokens


def test_base_continuation_on_its_own_kv_is_the_plain_forward(base):
    # The perfect-predictor reference: the KVP scoring path given the base's own K,V is the base's forward pass.
    tokens = windows()
    prompt_kv = base(tokens[:, :11], return_kv=True).kv
    on_own_kv = continuation_nll(GivenKVPath(base, prompt_kv), tokens, 12)
    np.testing.assert_allclose(on_own_kv, continuation_nll(PlainPath(base), tokens, 12), rtol=1e-4, atol=1e-4)
    # and the plain path's scoring (prefill + cached continuation) is the full forward pass's NLL
    log_probs = np.asarray(jax.nn.log_softmax(base(tokens[:, :-1]).logits[:, 11:]), np.float64)
    full = -np.take_along_axis(log_probs, tokens[:, 12:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(continuation_nll(PlainPath(base), tokens, 12), full, rtol=1e-4, atol=1e-4)
    assert not np.allclose(continuation_nll(NullCachePath(base), tokens, 12), full, atol=1e-3)


def test_kvp_continuation_differs_from_the_base_only_through_the_prompt(base):
    kvp = KVPModel.layer_pruned(base, 0.5, rngs=nnx.Rngs(0))
    tokens = windows()
    predicted = kvp.predict_kv(tokens[:, :11])
    np.testing.assert_allclose(continuation_nll(KVPPath(kvp), tokens, 12),
                               continuation_nll(GivenKVPath(base, predicted), tokens, 12), rtol=1e-4, atol=1e-4)
    assert not np.allclose(continuation_nll(KVPPath(kvp), tokens, 12), continuation_nll(PlainPath(base), tokens, 12),
                           atol=1e-3)


def test_greedy_answers_are_the_generated_text(base):
    tokenizer = ByteTokenizer()
    examples = [Example("The key of x is 12.\nAnswer:", "12"), Example("Answer:", "7")]
    answers = greedy_answers(lambda prompts, sampling: generate(base, prompts, sampling), tokenizer, examples,
                             max_new_tokens=3, batch_size=1)
    assert len(answers) == 2
    expected = generate(base, [[tokenizer.bos_id, *tokenizer.encode(examples[0].prompt)]],
                        greedy_config(tokenizer))[0]
    assert answers[0] == tokenizer.decode([int(t) for t in expected])
    assert exact_match_rate([" 12\n", " 8"], examples) == 0.5


def greedy_config(tokenizer):
    from lm_core.generation import SamplingConfig

    return SamplingConfig(max_new_tokens=3, pad_id=tokenizer.pad_id)
