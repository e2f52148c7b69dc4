"""The closed-book knowledge task, the base-model controls (null cache, random pruning), OpenELM's FLOPs and the
claim lines of kv_prediction's report."""

import math

import numpy as np
import pytest
from flax import nnx

from experiments.kv_prediction import claims
from experiments.kv_prediction.evaluation import task_sources, wilson_interval
from kv_prediction import baselines, knowledge, openelm, retrieval
from kv_prediction.model import KVPModel
from kv_prediction.serving import KVPPath, NullCachePath, PlainPath, generate, padded_prompts, read_prompt
from lm_core.config import ModelConfig
from lm_core.data import get_text_source
from lm_core.errors import UserError
from lm_core.generation import SamplingConfig
from lm_core.model import Transformer

CORPUS = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau",
          "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"]
OPTIONS = knowledge.KnowledgeOptions(entities=16, values=8, facts=3, filler_chars=30)


def test_the_fact_table_is_fixed_and_its_words_are_distinct():
    table = knowledge.fact_table(OPTIONS)
    assert len(table) == 16 * len(knowledge.RELATIONS) and table == knowledge.fact_table(OPTIONS)
    entities = {fact.entity for fact in table}
    assert len(entities) == 16
    for relation in knowledge.RELATIONS:
        values = {fact.value for fact in table if fact.relation == relation}
        assert values.isdisjoint(entities) and len(values) <= 8
    assert knowledge.fact_table(knowledge.KnowledgeOptions(entities=16, values=8, seed=1)) != table
    # more words than two syllables can spell (30^2 x 4 endings): later ones get longer instead of looping forever
    big = knowledge.fact_table(knowledge.KnowledgeOptions(entities=4096, values=512))
    assert len({fact.entity for fact in big}) == 4096


def test_training_documents_state_table_facts_and_never_the_evaluation_wording():
    table = knowledge.fact_table(OPTIONS)
    statements = {knowledge.statement(fact, t) for fact in table for t in range(5)}
    for index in range(20):
        document = knowledge.knowledge_document(OPTIONS, table, "train", index, CORPUS)
        assert sum(statement in document for statement in statements) >= OPTIONS.facts
        for fact in table:
            assert knowledge.RELATIONS[fact.relation][2].format(e=fact.entity) not in document
    assert knowledge.knowledge_document(OPTIONS, table, "train", 3, CORPUS) != knowledge.knowledge_document(
        OPTIONS, table, "validation", 3, CORPUS)


def test_every_fact_is_asked_once_after_one_solved_question_about_another_entity():
    table = knowledge.fact_table(OPTIONS)
    examples = knowledge.knowledge_examples(OPTIONS)
    assert [e.answer for e in examples] == [fact.value for fact in table]
    for example, fact in zip(examples, table, strict=True):
        shot, asked = example.prompt.split("\n")[0:2], example.prompt.split("\n")[2:]
        assert asked == [knowledge.question(fact).split("\n")[0], "Answer:"]
        shot_fact = next(f for f in table if knowledge.question(f).split("\n")[0] == shot[0])
        assert shot_fact.entity != fact.entity and shot_fact.relation == fact.relation
        assert shot[1] == f"Answer: {shot_fact.value}"  # the demonstration is answered correctly
    assert len(knowledge.knowledge_examples(OPTIONS, 5)) == 5


def test_spec_options_nesting_and_bad_options():
    options, inner = knowledge.parse_spec("entities=16,values=8:retrieval:facts=2:builtin")
    assert options == knowledge.KnowledgeOptions(entities=16, values=8) and inner == "retrieval:facts=2:builtin"
    sources = task_sources("knowledge:entities=16:retrieval:facts=3:builtin")
    assert sources.knowledge.entities == 16 and sources.retrieval.facts == 3 and sources.corpus == "builtin"
    assert task_sources("retrieval:knowledge:builtin").knowledge == knowledge.KnowledgeOptions()
    assert task_sources("builtin") == type(sources)(None, None, "builtin")
    for argument, fragment in [("entity=3:builtin", "unknown"), ("share=1:builtin", "share=1"),
                               ("entities=1:builtin", "entities=1"), ("values=x:builtin", "values=x"),
                               ("", "names no")]:
        with pytest.raises(UserError, match=fragment):
            knowledge.parse_spec(argument)


def test_mixed_sources_add_their_share_and_filler_is_corpus_text(tmp_path):
    for index in range(20):
        (tmp_path / f"doc{index:02d}.txt").write_text(" ".join(CORPUS) * 3)
    source = get_text_source(f"knowledge:share=0.3,entities=16:retrieval:share=0.3:files:{tmp_path}/*.txt")
    train = source.split("train")
    recall_mix, corpus = train.corpus, train.corpus.corpus
    added = [train[i] for i in range(len(recall_mix), len(train))]
    share = sum(map(len, added)) / sum(len(train[i]) for i in range(len(train)))
    assert 0.2 < share < 0.4
    assert not any("Recall:" in text for text in added)  # filler never comes from the recall documents
    assert any("Recall:" in recall_mix[i] for i in range(len(corpus), len(recall_mix)))


# --- the controls -----------------------------------------------------------------------------------------------

CONFIG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                     max_seq_len=64)


def test_the_null_cache_knows_only_the_last_prompt_token():
    base = Transformer(CONFIG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(4, 64, 9), 9], [1, *rng.integers(4, 64, 9), 9]]  # same length and last token
    tokens, positions, segment_ids = padded_prompts(prompts)
    null_logits, cache = read_prompt(*nnx.split(NullCachePath(base)), tokens, positions, segment_ids, 16)
    assert not np.asarray(cache.layers[0].values[:, :tokens.shape[1] - 1]).any()  # zeros in every prompt slot
    np.testing.assert_allclose(null_logits[0], null_logits[1], atol=1e-6)
    full_logits = base(tokens).logits[:, -1]
    assert not np.allclose(full_logits[0], full_logits[1], atol=1e-3)  # the prompts do differ for the base
    generated = generate(NullCachePath(base), prompts, SamplingConfig(max_new_tokens=4))
    np.testing.assert_array_equal(generated[0], generated[1])


def test_true_kv_from_a_position_on_interpolates_between_kvp_and_the_base():
    base = Transformer(CONFIG, rngs=nnx.Rngs(0))
    kvp = KVPModel.layer_pruned(base, 0.5, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    prompts = [[1, *rng.integers(4, 64, 9)], [1, *rng.integers(4, 64, 5)]]  # different lengths: left padding
    sampling = SamplingConfig(max_new_tokens=4)
    all_true = generate(baselines.true_suffix_path(kvp, prompts, [0, 0]), prompts, sampling)
    np.testing.assert_array_equal(all_true, generate(PlainPath(base), prompts, sampling))
    none_true = generate(baselines.true_suffix_path(kvp, prompts, [len(p) for p in prompts]), prompts, sampling)
    np.testing.assert_array_equal(none_true, generate(KVPPath(kvp), prompts, sampling))
    no_layer = generate(baselines.true_suffix_path(kvp, prompts, [0, 0], layers=()), prompts, sampling)
    np.testing.assert_array_equal(no_layer, generate(KVPPath(kvp), prompts, sampling))
    every_layer = baselines.true_suffix_path(kvp, prompts, [0, 0], layers=range(CONFIG.num_layers))
    np.testing.assert_array_equal(generate(every_layer, prompts, sampling), all_true)
    true_kv = baselines.true_suffix_path(kvp, prompts, [0, 0]).prompt_kv
    predicted = baselines.true_suffix_path(kvp, prompts, [0, 0], layers=()).prompt_kv
    first_only = baselines.true_suffix_path(kvp, prompts, [0, 0], layers={0}).prompt_kv
    np.testing.assert_array_equal(first_only[0].keys, true_kv[0].keys)
    np.testing.assert_array_equal(first_only[1].values, predicted[1].values)
    assert not np.allclose(first_only[1].values, true_kv[1].values)  # layer 1 really kept its prediction


def test_random_pruning_keeps_the_ends_the_order_and_the_fraction():
    prompts = [list(range(100, 140)), list(range(10, 13)), [5]]
    pruned = baselines.pruned_prompts(prompts, 0.25, seed=3)
    assert len(pruned[0]) == 10 and pruned[0][0] == 100 and pruned[0][-1] == 139
    assert pruned[0] == sorted(pruned[0]) and set(pruned[0]) <= set(prompts[0])
    assert pruned[1] == [10, 12] and pruned[2] == [5]
    assert baselines.pruned_prompts(prompts, 1.0) == prompts
    with pytest.raises(UserError, match="keep_fraction=0"):
        baselines.pruned_prompts(prompts, 0)


# --- OpenELM's shapes give the paper's TTFT FLOPs reductions ----------------------------------------------------


def test_openelm_shapes_reproduce_the_papers_flops_reductions_and_sizes():
    for spec, paper in openelm.PAPER_REDUCTIONS.items():
        assert openelm.paper_flops_reduction(spec) == pytest.approx(paper, rel=0.005), spec
    for size, published in (("1.1B", 1.08e9), ("450M", 0.46e9), ("270M", 0.27e9)):
        layers, width = openelm.SIZES[size]
        params = openelm.forward_flops_per_token(openelm.openelm_layers(layers, width), width) / 2
        assert params == pytest.approx(published, rel=0.02), size
    first, last = openelm.openelm_layers(28, 2048)[0], openelm.openelm_layers(28, 2048)[-1]
    assert (first.query_heads, first.kv_heads, last.query_heads, last.kv_heads) == (16, 4, 32, 8)


# --- the claim lines ---------------------------------------------------------------------------------------------


def test_wilson_interval_by_hand():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(0, 400)[0] == pytest.approx(0, abs=1e-12) and 0 < wilson_interval(0, 400)[1] < 0.01


def _row(name, kind, em, n=400, layers=2, keep=None):
    hits = round(em * n)
    scores = {"exact_match": hits / n, "exact_match_ci95": wilson_interval(hits, n), "questions": n}
    row = {"name": name, "kind": kind, "layers": layers, "tasks": {"closed_book": scores, "recall": dict(scores)},
           "perplexity": 10.0, "flops_reduction": 4.0, "measured_reduction": 3.0}
    return {**row, "keep_fraction": keep} if keep is not None else row


def test_claims_call_a_gain_only_when_it_is_large_and_beyond_the_noise():
    rows = [_row("base", "base", 0.6), _row("base", "null_cache", 0.03), _row("c64x2", "aux_only", 0.20),
            _row("c64x2", "kvp", 0.30), _row("c64x2", "pruning", 0.05, keep=0.2), _row("lp0.25", "aux_only", 0.30),
            _row("lp0.25", "kvp", 0.32, layers=1), _row("lp0.25", "pruning", 0.05, keep=0.3)]
    line = claims.gain_claim(rows, "closed_book")
    assert "c64x2 30.0%" in line and "(1.50x" in line and "✓" in line and "partly reproduced (1 of 2" in line
    assert math.isclose(claims.z_score(rows[3]["tasks"]["closed_book"], rows[2]["tasks"]["closed_book"]),
                        (0.30 - 0.20) / math.sqrt(0.25 * 0.75 * 2 / 400))
    assert "REPRODUCED" in claims.base_claim(rows, "closed_book")
    assert "REPRODUCED" in claims.pruning_claim(rows, "closed_book")
    assert "near chance" in claims.context_line(rows, {"closed_book": 0.03, "recall": 0.5})  # 32%
    rows[6]["tasks"]["recall"] = _row("x", "kvp", 0.9)["tasks"]["recall"]
    assert "ABOVE chance" in claims.context_line(rows, {"closed_book": 0.03, "recall": 0.5})


def test_recall_needs_the_prompt_with_two_facts_of_one_category():
    # Two facts of ONE category: a model that knows which values the prompt holds but not whose they are picks
    # the asked person's value half the time.
    examples = retrieval.retrieval_examples(retrieval.RetrievalOptions(facts=2, filler_chars=20), CORPUS, 200)
    first_stated = [e.prompt.split(". ", 2)[1].split()[-1] == e.answer for e in examples]
    assert 0.35 < np.mean(first_stated) < 0.65
