"""Training keeps only finite states: a step whose objective, gradient norm or updated parameters are not finite is
not applied (decided inside the jitted step), the run stops naming the step, the newest checkpoint is the state
before it with the data position of that step's batch, and non-finite config values are refused in one line."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lm_core import optim, sharding
from lm_core import train_step as ts
from lm_core.errors import TrainingDiverged, UserError
from lm_core.loss import next_token_loss
from lm_core.model import Transformer
from tests.helpers import random_batch, tiny_config, tiny_run


def poisoned_loss(model, batch, rng):
    """next_token_loss, times NaN when the batch carries a positive "poison" entry: bad data at a known step
    (NaN reaches the gradients too, as a corrupt batch's would)."""
    clean = {name: value for name, value in batch.items() if name != "poison"}
    loss, metrics = next_token_loss(model, clean, rng)
    if "poison" in batch:
        loss = loss * jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, 1.0)
    return loss, metrics


def infinite_updates() -> optax.GradientTransformation:
    """An optimizer whose updates overflow: the loss and gradients stay finite, the updated parameters do not."""
    return optax.GradientTransformation(lambda params: optax.EmptyState(),
                                        lambda updates, state, params=None: (
                                            jax.tree.map(lambda u: u + jnp.inf, updates), state))


def host_copy(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("case", ["objective", "updated_parameters"])
def test_a_non_finite_step_is_not_applied_and_keeps_the_sharding(case):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    optimizer = infinite_updates() if case == "updated_parameters" else optim.make_optimizer(
        optim.OptimizerConfig(warmup_steps=0))
    graphdef, state, shardings = ts.init_train_state(lambda: Transformer(tiny_config(), rngs=nnx.Rngs(0)),
                                                     optimizer, mesh, 0)
    step = ts.make_train_step(graphdef, poisoned_loss, optimizer, mesh, shardings)
    batch = dict(random_batch(0), poison=np.zeros((8,), np.int32))
    if case == "updated_parameters":
        state, metrics = step(state, batch)
        assert not bool(metrics["finite"]) and math.isfinite(float(metrics["objective"]))
        assert math.isfinite(float(metrics["grad_norm"])) and int(state.step) == 0
        return
    state, metrics = step(state, batch)  # one good step first: an optimizer state worth keeping
    assert bool(metrics["finite"]) and int(state.step) == 1
    before = host_copy(state)
    batch["poison"][3] = 1
    state, metrics = step(state, batch)
    assert not bool(metrics["finite"]) and math.isnan(float(metrics["objective"]))
    after = host_copy(state)
    assert int(after.step) == 1
    for kept, previous in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(kept, previous)
    for leaf, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params), strict=True):
        assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
    batch["poison"][3] = 0
    state, metrics = step(state, batch)  # the kept state trains on
    assert bool(metrics["finite"]) and int(state.step) == 2


def test_a_step_after_a_non_finite_one_is_not_applied_even_when_it_is_finite():
    """The trainer reads a step's flag back only after dispatching the next step; it passes the flag on the device
    (`proceed`), so the next step is not applied either and the state it finally reads is the last finite one."""
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
    optimizer = optim.make_optimizer(optim.OptimizerConfig(warmup_steps=0))
    graphdef, state, shardings = ts.init_train_state(lambda: Transformer(tiny_config(), rngs=nnx.Rngs(0)),
                                                     optimizer, mesh, 0)
    step = ts.make_train_step(graphdef, poisoned_loss, optimizer, mesh, shardings)
    clean, poisoned = (dict(random_batch(0), poison=np.full((8,), flag, np.int32)) for flag in (0, 1))
    state, good = step(state, clean)
    before = host_copy(state)
    state, bad = step(state, poisoned, good["finite"])
    state, after_bad = step(state, clean, bad["finite"])  # finite numbers, but it follows a non-finite step
    assert (bool(good["finite"]), bool(bad["finite"]), bool(after_bad["finite"])) == (True, False, False)
    assert math.isfinite(float(after_bad["objective"]))
    for kept, previous in zip(jax.tree.leaves(host_copy(state)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(kept, previous)
    state, resumed = step(state, clean, good["finite"])
    assert bool(resumed["finite"]) and int(state.step) == 2


def test_the_trainer_reads_a_step_back_after_dispatching_the_next_except_where_it_saves(tmp_path, monkeypatch):
    """The host never waits for the step it just dispatched: step k's flag is read after step k + 1 is on its way,
    and step k + 1 gets step k's flag as `proceed`. Saving steps (4 and 8 here) are read back at once, so the step
    after one needs no flag."""
    from lm_core import trainer

    events: list[tuple] = []

    class SpiedFlag:
        def __init__(self, step: int, value):
            self.step, self.value = step, value

        def __bool__(self) -> bool:
            events.append(("read", self.step))
            return bool(self.value)

    def spying_make_train_step(*args, **kwargs):
        real_step = ts.make_train_step(*args, **kwargs)

        def run(state, batch, proceed=None):
            number = sum(event[0] == "dispatch" for event in events) + 1
            events.append(("dispatch", number, proceed.step if proceed is not None else None))
            state, metrics = real_step(state, batch, None if proceed is None else proceed.value)
            return state, dict(metrics, finite=SpiedFlag(number, metrics["finite"]))

        return run

    monkeypatch.setattr(trainer, "make_train_step", spying_make_train_step)
    trainer.train(tiny_run(tmp_path, checkpoint_every=4), tmp_path / "run")
    expected = [("dispatch", 1, None), ("dispatch", 2, 1), ("read", 1), ("dispatch", 3, 2), ("read", 2),
                ("dispatch", 4, 3), ("read", 3), ("read", 4), ("dispatch", 5, None), ("dispatch", 6, 5), ("read", 5),
                ("dispatch", 7, 6), ("read", 6), ("dispatch", 8, 7), ("read", 7), ("read", 8)]
    assert events == expected


def poison_at(step: int):
    """A TrainTask.make_data whose loader marks the batch of `step` (counted from the run's start) as poisoned."""
    from lm_core.run_data import TrainData, text_train_data

    class Poisoning:
        def __init__(self, loader):
            self.loader = loader
            self.step = 0

        def next(self):
            self.step += 1
            batch = self.loader.next()
            rows = next(iter(batch.values())).shape[0]
            return dict(batch, poison=np.full((rows,), int(self.step == step), np.int32))

        def state(self):
            return dict(self.loader.state(), step=self.step)

        def restore(self, saved):
            self.step = saved.pop("step", 0)
            self.loader.restore(saved)

    def make_data(config, workdir, model_config) -> TrainData:
        data = text_train_data(config, workdir, model_config)
        return TrainData(data.tokenizer, Poisoning(data.loader), data.eval_batches)

    return make_data


def checkpoint_params(workdir: Path, step: int) -> list[np.ndarray]:
    import orbax.checkpoint as ocp

    from lm_core.checkpoint import Checkpointer

    checkpointer = Checkpointer(workdir / "checkpoints")
    # Without a target structure Orbax restores the saved arrays as they are: what was written, nothing inferred.
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    checkpointer.close()
    params = [np.asarray(leaf) for leaf in jax.tree.leaves(restored["state"]["params"])]
    assert params, f"checkpoint {step} in {workdir} holds no parameters"
    return params


@pytest.mark.slow
def test_a_diverged_run_stops_naming_the_step_keeps_the_state_before_it_and_resumes(tmp_path):
    from lm_core.trainer import train
    from tests.helpers import task_with_loss

    clean = task_with_loss(poisoned_loss, make_data=poison_at(0))
    train(tiny_run(tmp_path, checkpoint_every=4), tmp_path / "clean", clean)  # checkpoints 4 and 8

    workdir = tmp_path / "poisoned"
    with pytest.raises(TrainingDiverged) as stopped:
        train(tiny_run(tmp_path), workdir, task_with_loss(poisoned_loss, make_data=poison_at(5)))
    message = str(stopped.value)
    assert "\n" not in message and "at step 5" in message and "learning rate" in message
    assert "bad data" in message and str(workdir / "checkpoints" / "4") in message
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [3, 4]
    for diverged, uninterrupted in zip(checkpoint_params(workdir, 4), checkpoint_params(tmp_path / "clean", 4),
                                       strict=True):
        assert np.all(np.isfinite(diverged))
        np.testing.assert_array_equal(diverged, uninterrupted)

    # Rerun with the data fixed: it resumes at step 4, retries step 5's batch and ends as the clean run did.
    result = train(tiny_run(tmp_path), workdir, clean)
    assert result.step == 8
    for resumed, uninterrupted in zip(checkpoint_params(workdir, 8), checkpoint_params(tmp_path / "clean", 8),
                                      strict=True):
        np.testing.assert_array_equal(resumed, uninterrupted)


@pytest.mark.parametrize("field", ["z_loss", "optimizer.grad_clip", "optimizer.learning_rate", "model.rope_theta",
                                   "optimizer.weight_decay"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_config_values_are_refused_naming_the_field(field, value):
    from lm_core.run_config import default_config, validate_run_config

    config = default_config()
    parent, _, name = field.rpartition(".")
    (config[parent] if parent else config)[name] = value
    with pytest.raises(UserError, match=f"{field}={value}") as refused:
        validate_run_config(config)
    assert "finite" in str(refused.value)


def test_non_finite_sampling_temperature_is_refused():
    from lm_core.generation import SamplingConfig

    for value in (math.nan, math.inf):
        with pytest.raises(UserError, match=f"temperature={value}"):
            SamplingConfig(temperature=value)
