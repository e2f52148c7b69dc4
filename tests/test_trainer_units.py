import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core.errors import UserError
from lm_core.model import Transformer
from lm_core.run_config import default_config, validate_run_config
from lm_core.task import Evaluation
from lm_core.trainer import make_eval_fn, summarise_eval
from tests.helpers import random_batch, tiny_config


def test_summarise_eval_hand_values():
    out = summarise_eval({"nll": 10.0, "tokens": 5.0, "unigram_nll": 2.5}, chars=20.0)
    assert out["eval_loss"] == 2.0
    assert out["eval_bpc"] == pytest.approx(10.0 / (20.0 * math.log(2)))
    assert out["eval_unigram_nll"] == 0.5


def test_eval_fn_sums_and_extra_statistics():
    model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = {k: jnp.asarray(v) for k, v in random_batch(0, batch=2, seq=8).items()}
    batch["loss_mask"] = batch["loss_mask"].at[:, -3:].set(0.0)
    evaluate = make_eval_fn(graphdef, Evaluation(lambda logits, b: {"top1": jnp.sum(
        (jnp.argmax(logits, -1) == b["targets"]) * b["loss_mask"])}))
    sums = evaluate(params, batch)
    logits = model(batch["inputs"]).logits
    log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    nll = -np.take_along_axis(np.asarray(log_probs), np.asarray(batch["targets"])[..., None], -1)[..., 0]
    assert float(sums["tokens"]) == 10.0
    assert float(sums["nll"]) == pytest.approx(float(np.sum(nll[:, :5])), rel=1e-5)
    hits = (np.argmax(np.asarray(logits), -1) == np.asarray(batch["targets"])) * np.asarray(batch["loss_mask"])
    assert float(sums["top1"]) == float(hits.sum())  # the task's statistic, summed over the kept tokens only


def test_run_config_validation():
    config = default_config()
    validate_run_config(config)
    config.eval_every = -1
    with pytest.raises(UserError, match="eval_every=-1"):
        validate_run_config(config)
    config = default_config()
    config.data.tokenizer = "wordpiece"
    with pytest.raises(UserError, match="data.tokenizer='wordpiece'"):
        validate_run_config(config)


def test_task_meta_mismatch_is_refused(tmp_path):
    from lm_core.trained_runs import check_same_meta

    check_same_meta({"aux": {"layers": 2}}, {"aux": {"layers": 2}}, tmp_path)
    with pytest.raises(UserError, match="aux: checkpoint"):
        check_same_meta({"aux": {"layers": 2}}, {"aux": {"layers": 3}}, tmp_path)


def test_default_config_derives_head_dim_from_the_final_sizes():
    from lm_core.run_config import model_config_from

    config = default_config()
    config.model.d_model = 128
    config.model.num_heads = 4
    model = model_config_from(config)
    assert model.head_dim == 32 and model.num_kv_heads == 4 and model.d_ff == 344


def test_a_failed_background_save_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch):
    from lm_core.checkpoint import Checkpointer

    checkpointer = Checkpointer(tmp_path / "checkpoints")
    checkpointer.save(1, {"w": jnp.ones(3)}, {}, {})
    checkpointer.wait()

    def disk_full() -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointer.manager, "check_for_errors", disk_full)
    with pytest.raises(UserError, match=r"saving checkpoint .*checkpoints/1 failed \(\[Errno 28\] No space") as error:
        checkpointer.raise_if_save_failed()
    assert "\n" not in str(error.value)
    monkeypatch.undo()
    checkpointer.close()


@pytest.mark.slow
def test_a_checkpoint_directory_lost_mid_run_fails_at_the_next_save_not_at_the_end(tmp_path):
    from lm_core.metrics import read_metrics
    from lm_core.run_data import TrainData, text_train_data
    from lm_core.task import TrainTask
    from lm_core.trainer import train
    from tests.helpers import tiny_run

    workdir = tmp_path / "run"

    class LosesItsCheckpoints:  # at step 1 the checkpoint directory is replaced by a file (a disk gone bad)
        def __init__(self, loader):
            self.loader, self.state, self.restore = loader, loader.state, loader.restore

        def next(self):
            (workdir / "checkpoints").rename(workdir / "checkpoints.moved")
            (workdir / "checkpoints").write_text("")
            self.next = self.loader.next
            return self.loader.next()

    def make_data(config, directory, model_config) -> TrainData:
        data = text_train_data(config, directory, model_config)
        return TrainData(data.tokenizer, LosesItsCheckpoints(data.loader), data.eval_batches)

    with pytest.raises(UserError, match=f"cannot write checkpoints to {workdir / 'checkpoints'}"):
        train(tiny_run(tmp_path, steps=40, checkpoint_every=2), workdir, TrainTask(make_data=make_data))
    assert [row["step"] for row in read_metrics(workdir / "metrics.jsonl")] == [1, 2]


def test_load_trained_model_reads_only_the_parameters_straight_into_a_mesh(tmp_path, monkeypatch):
    from lm_core import sharding
    from lm_core.checkpoint import Checkpointer
    from lm_core.trained_runs import load_trained_model
    from lm_core.trainer import train
    from tests.helpers import tiny_run

    train(tiny_run(tmp_path, steps=2, checkpoint_every=2), tmp_path / "run")
    # The optimizer state is never restored: a full-state restore now fails the test.
    monkeypatch.setattr(Checkpointer, "restore", lambda *a, **k: pytest.fail("restored the whole train state"))
    single, _, step = load_trained_model(tmp_path / "run")
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=8))
    sharded, _, _ = load_trained_model(tmp_path / "run", mesh=mesh)
    assert step == 2
    table = sharded.embedding.table[...]
    assert len(table.sharding.device_set) == 8 and not table.sharding.is_fully_replicated
    for mine, theirs in zip(jax.tree.leaves(nnx.state(single)), jax.tree.leaves(nnx.state(sharded)), strict=True):
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


def test_a_byte_run_with_reserved_ids_loads_back_with_them(tmp_path):
    """A byte run's saved tokenizer keeps its reserved ids (MoMa's image codes); reading the run back must not
    shrink the vocabulary to the 260 plain byte ids."""
    from lm_core.tokenizer import MODEL_FILENAME, ByteTokenizer
    from lm_core.trained_runs import load_trained_model
    from lm_core.trainer import train
    from tests.helpers import tiny_run

    train(tiny_run(tmp_path, steps=1, checkpoint_every=1), tmp_path / "run")  # a byte run with no reserved ids
    assert load_trained_model(tmp_path / "run")[1].vocab_size == 260
    ByteTokenizer(num_reserved_ids=4).save(tmp_path / "run" / MODEL_FILENAME)  # as a MoMa byte run saves its own
    tokenizer = load_trained_model(tmp_path / "run")[1]
    assert (tokenizer.vocab_size, tokenizer.num_reserved_ids) == (264, 4)


def test_a_resume_on_another_corpus_of_the_same_size_is_refused_naming_both(tmp_path):
    from lm_core.trainer import train
    from tests.helpers import tiny_run

    config = tiny_run(tmp_path, steps=2, checkpoint_every=2)
    train(config, tmp_path / "run")
    other = tmp_path / "other"
    other.mkdir()
    for index in range(24):  # as many documents as the first corpus, other words
        (other / f"{index}.txt").write_text(f"record {index}: " + "a lazy dog sleeps under the tree. " * 40)
    before = (tmp_path / "run" / "config.json").read_text()
    config.steps = 4
    config.data.source = f"files:{other}/*.txt"
    with pytest.raises(UserError, match=r"content_digest: saved \d+, now \d+.*trained on data.source='files:.*corpus"
                                        r"/\*\.txt', this run reads 'files:.*other/\*\.txt'") as error:
        train(config, tmp_path / "run")
    assert "\n" not in str(error.value)
    assert (tmp_path / "run" / "config.json").read_text() == before  # nothing written
    config.data.source = f"files:{tmp_path / 'corpus'}/*.txt"  # the same corpus resumes
    assert train(config, tmp_path / "run").step == 4


def test_every_scalar_a_loss_returns_is_logged_without_overriding_the_loops_entries(tmp_path):
    from lm_core.loss import next_token_loss
    from lm_core.metrics import read_metrics
    from lm_core.trainer import train
    from tests.helpers import task_with_loss, tiny_run

    def loss_with_a_statistic(model, batch, rng):
        loss, metrics = next_token_loss(model, batch, rng)
        return loss, dict(metrics, share_of_pad=jnp.mean(batch["loss_mask"] == 0), per_row=batch["loss_mask"][:, 0])

    train(tiny_run(tmp_path, steps=2, checkpoint_every=2), tmp_path / "run", task_with_loss(loss_with_a_statistic))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["share_of_pad"] <= 1.0 and "per_row" not in row and "finite" not in row
        assert row["nll"] > 0 and row["tokens"] == row["step"] * 8 * 32  # tokens seen, not the batch's count


def test_from_section_fills_a_config_dataclass_and_refuses_unknown_keys():
    import dataclasses

    import ml_collections

    from lm_core.run_config import from_section

    @dataclasses.dataclass(frozen=True)
    class Section:
        width: int = 4
        depth: int = 2

    section = ml_collections.ConfigDict(dict(width=8, where="elsewhere"))
    assert from_section(Section, section, "paper.section", other_keys=("where",)) == Section(width=8, depth=2)
    with pytest.raises(UserError, match=r"^paper.section has unknown field\(s\) \['where'\]; valid: \['depth', "
                                        r"'width'\]$"):
        from_section(Section, section, "paper.section")


def test_every_image_tokenizer_field_of_a_moma_config_reaches_the_vq_config():
    from experiments.configs import moma_tiny
    from experiments.moma.task import vq_config_from

    config = moma_tiny.get_config("moe_4t4i")
    config.moma.image_tokenizer.update(dict(beta=0.5, ema_decay=0.9, dead_code_threshold=0.1, code_dim=16))
    vq = vq_config_from(config)
    assert (vq.beta, vq.ema_decay, vq.dead_code_threshold, vq.code_dim) == (0.5, 0.9, 0.1, 16)
