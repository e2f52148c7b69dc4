"""WORKSPACE.md's "How to add a paper" walk-through works as written: its files are extracted, the loss is checked
by hand, the config loads, the entrypoint parses, and the task trains through lm_core's loop."""

import importlib
import importlib.util
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_core.model import Transformer
from tests.helpers import ROOT, random_batch, tiny_config, tiny_run

BLOCK = re.compile(r"```python\n# file: (?P<path>\S+)\n(?P<code>.*?)```", re.S)


def walkthrough_files() -> dict[str, str]:
    text = (ROOT / "WORKSPACE.md").read_text()
    section = text[text.index("## How to add a paper"):]
    section = section[:section.index("\n## ", 3)] if "\n## " in section[3:] else section
    return {m["path"]: m["code"] for m in BLOCK.finditer(section)}


@pytest.fixture
def walkthrough(tmp_path, monkeypatch):
    """The walk-through's files under tmp_path, importable as `label_smoothing` and `experiments.label_smoothing`."""
    files = walkthrough_files()
    assert set(files) == {"label_smoothing/loss.py", "experiments/label_smoothing/task.py",
                          "experiments/configs/label_smoothing_tiny.py", "experiments/label_smoothing/train.py"}
    for path, code in files.items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(code)
    for package in ("label_smoothing", "experiments/label_smoothing"):
        (tmp_path / package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import experiments

    monkeypatch.setattr(experiments, "__path__", [*experiments.__path__, str(tmp_path / "experiments")])
    yield tmp_path
    for name in [n for n in sys.modules if "label_smoothing" in n]:
        del sys.modules[name]


def test_the_walkthrough_loss_is_label_smoothing_by_hand(walkthrough):
    loss_fn = importlib.import_module("label_smoothing.loss").label_smoothed_loss
    model = Transformer(tiny_config(), rngs=nnx.Rngs(0))
    batch = {k: jnp.asarray(v) for k, v in random_batch(1, batch=2, seq=8).items()}
    logits = np.asarray(model(batch["inputs"]).logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    mask = np.asarray(batch["loss_mask"])
    nll = -np.take_along_axis(log_probs, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    ce, uniform = (nll * mask).sum() / mask.sum(), (-log_probs.mean(-1) * mask).sum() / mask.sum()
    for smoothing in (0.0, 0.1, 1.0):
        loss, metrics = loss_fn(model, batch, None, smoothing=smoothing)
        assert float(loss) == pytest.approx((1 - smoothing) * ce + smoothing * uniform, rel=1e-5)
        assert float(metrics["uniform_nll"]) == pytest.approx(uniform, rel=1e-5)


def test_the_walkthrough_task_trains_and_logs_its_statistics(walkthrough, tmp_path):
    from lm_core.metrics import read_metrics
    from lm_core.trainer import train

    task_module = importlib.import_module("experiments.label_smoothing.task")
    config = config_module(walkthrough).get_config()
    assert config.label_smoothing.smoothing == 0.1
    run = tiny_run(tmp_path, steps=3, eval_every=3, eval_batches=1, checkpoint_every=0)
    run.label_smoothing = config.label_smoothing
    result = train(run, tmp_path / "run", task_module.label_smoothing_task(run))
    assert result.step == 3
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["uniform_nll"] > last["loss"] > 0  # a uniform target is far worse than the data's own
    assert 0.0 <= last["eval_top1"] <= 1.0 and np.isfinite(last["eval_loss"])


def config_module(root):
    spec = importlib.util.spec_from_file_location("label_smoothing_tiny",
                                                  root / "experiments/configs/label_smoothing_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Runs the walk-through's entrypoint as `python -m experiments.label_smoothing.train` would, with its files found
# beside the repository's packages.
LAUNCH = """
import runpy, sys
root = sys.argv.pop(1)
sys.path.insert(0, root)
import experiments
experiments.__path__.append(root + "/experiments")
sys.argv[0] = "train"
runpy.run_module("experiments.label_smoothing.train", run_name="__main__")
"""


@pytest.mark.slow
def test_the_walkthrough_entrypoint_trains_and_refuses_a_bad_override_in_one_line(walkthrough, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(12):
        (corpus / f"{index}.txt").write_text(f"document {index}: " + "the quick brown fox jumps. " * 30)
    small = ["--config.steps=2", "--config.eval_every=0", "--config.checkpoint_every=0", "--config.log_every=1",
             f"--config.data.source=files:{corpus}/*.txt", "--config.data.tokenizer=byte", "--config.data.seq_len=32",
             "--config.data.global_batch_size=8", "--config.model.vocab_size=264", "--config.model.d_model=32",
             "--config.model.num_layers=1", "--config.model.num_heads=2", "--config.model.max_seq_len=64",
             "--config.optimizer.warmup_steps=1"]

    def launch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", LAUNCH, str(walkthrough), *args], cwd=ROOT, text=True,
                              capture_output=True, timeout=600)

    done = launch(f"--workdir={tmp_path / 'run'}", *small)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "done: step 2" in done.stdout and (tmp_path / "run" / "checkpoints").is_dir()
    refused = launch(f"--workdir={tmp_path / 'bad'}", *small, "--config.label_smoothing.nope=1")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "nope" in refused.stderr
