"""The benchmarks run and report what they promise (their numbers are read by people, never asserted on)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_interleaved_timing_settles_each_run_before_timing_it():
    from benchmarks.common import interleaved_median_seconds

    calls = []
    runs = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    seconds = interleaved_median_seconds(runs, repeats=2, warmup=1, settle=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert set(seconds) == {"a", "b"}


def test_train_step_benchmark_reports_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--json", "--steps=1", "--batch=2",
                             "--seq=32", f"--profile={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "mfu", "matmul_flops_per_s", "compile_s", "peak_memory_bytes", "d_ff"):
        assert key in report
    assert (report["d_ff"], report["dtype"], report["backend"]) == (688, "float32", "cpu")
    # the bench model: untied V·d twice + 4 layers of (q, k, v, o 4·256·256 + FFN 3·256·688 + 2 norms) + final norm
    assert report["params"] == 2 * 4096 * 256 + 4 * (4 * 256 * 256 + 3 * 256 * 688 + 2 * 256) + 256 == 5_261_568
    # 3 x (q,k,v,o 2·4·256·64·16 + scores 4·4·4·64·(32+1)/2 + FFN 2·4·3·256·688 + output 2·256·4096)
    assert report["flops_per_token"] == 3 * (2_097_152 + 67_584 + 4_227_072 + 2_097_152)
    assert report["tokens_per_s"] == pytest.approx(2 * 32 / report["step_s"], rel=1e-12)
    model_flops_per_s = report["tokens_per_s"] * report["flops_per_token"]
    assert report["model_flops_per_s"] == pytest.approx(model_flops_per_s, rel=1e-12)
    assert report["mfu"] == pytest.approx(model_flops_per_s / report["peak_flops_per_s"], rel=1e-12)
    # on a CPU the peak is the matmul rate measured in the same process (lm_core.flops.peak_flops_per_s)
    assert report["peak_source"] == "measured matmul (cpu, float32)" and report["peak_flops_per_s"] > 0
    assert report["compile_s"] > 0 and report["peak_memory_bytes"] > 0
    profile = report["profile"]
    assert Path(profile["trace_file"]).is_file() and profile["busy_s"] > 0
    top = profile["top_ops"]
    seconds = [op["seconds_per_call"] for op in top]
    assert top and seconds == sorted(seconds, reverse=True)  # most time first
    # which ops make the top 15 of one short traced run varies with load; that the step has matmuls does not
    assert profile["matmul_s"] > 0 and profile["other_s"] > 0
    top_matmul = profile["top_matmul"]
    assert top_matmul["is_matmul"] and top_matmul["seconds_per_call"] <= seconds[0]
    # the HLO describes the step's dots (which matmul tops the list varies: a library fusion the runtime names,
    # e.g. ynn_fusion, has no HLO line to describe it)
    assert profile["described_matmuls"] > 0


def test_op_profile_ranks_ops_and_measures_busy_time_by_hand():
    from benchmarks.op_profile import busy_microseconds, is_matmul, op_descriptions, rank_ops

    events = [  # two calls; the matmul overlaps "a" in the first; wrappers and instant events are not ops
        {"ph": "X", "name": "a", "ts": 0, "dur": 10},
        {"ph": "X", "name": "ynn_fusion.3", "ts": 5, "dur": 10},
        {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0, "dur": 100},
        {"ph": "X", "name": "a", "ts": 50, "dur": 4},
        {"ph": "i", "name": "a", "ts": 60},
    ]
    assert busy_microseconds([events[0], events[1], events[3]]) == 15 + 4
    hlo = ('  %ynn_fusion.3 = f32[8,16]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%c, '
           'metadata={op_name="jit(step)/transpose(jvp())/dot_general" stack_frame_id=1}\n')
    assert op_descriptions(hlo) == {"ynn_fusion.3": "f32[8,16] fusion <- jit(step)/transpose(jvp())/dot_general"}
    profile = rank_ops({"traceEvents": events}, calls=2, trace_file=Path("t"), descriptions=op_descriptions(hlo))
    assert [op.name for op in profile.ops] == ["a", "ynn_fusion.3"]
    a, dot = profile.ops
    assert a.seconds_per_call == 7e-6 and a.executions_per_call == 1 and not a.is_matmul
    assert dot.seconds_per_call == 5e-6 and dot.is_matmul and dot.description.startswith("f32[8,16]")
    assert profile.busy_seconds_per_call == 19 / 2 / 1e6
    # a library fusion of a reduction is not a matmul; an Eigen dot is, whatever its JAX operation is called
    assert not is_matmul("ynn_fusion.47", "f32[8,4,1,64] fusion <- jit(step)/transpose(jvp())/reduce_sum")
    assert is_matmul("dot.26", "f32[256,688] dot <- jit(step)/transpose(jvp())/transpose")
    assert is_matmul("ynn_fusion.9") and not is_matmul("add_fusion.2")


def test_decode_benchmark_reports_json():
    result = subprocess.run([sys.executable, "-m", "benchmarks.decode", "--json", "--new_tokens=4", "--prompt=8",
                             "--size=bench"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    params = 5_261_568  # the bench model of benchmarks.train_step (test_train_step_benchmark_reports_json)
    assert report["param_bytes"] == 4 * params
    for batch in (1, 8):
        # every f32 weight but the untied embedding's unused rows, and the f32 cache: K and V of 4 layers, each
        # [batch, 8 + 4 slots (prompt + new tokens), 4 heads, 64]
        cache_bytes = 4 * 2 * 4 * batch * 12 * 4 * 64
        assert report[f"batch{batch}_bytes_per_step"] == 4 * (params - 4096 * 256 + batch * 256) + cache_bytes
        tokens_per_s, bound = report[f"batch{batch}_tokens_per_s"], report[f"batch{batch}_bound_tokens_per_s"]
        assert tokens_per_s > 0 and report[f"batch{batch}_matvec_ceiling_tokens_per_s"] > 0
        assert report[f"batch{batch}_fraction_of_bound"] == pytest.approx(tokens_per_s / bound, rel=1e-12)
    # the reported copy bandwidth is the one batch 1's bound divides (batch 8 measures its own, not reported)
    assert report["batch1_bound_tokens_per_s"] == pytest.approx(
        report["copy_bandwidth_bytes_per_s"] / report["batch1_bytes_per_step"], rel=1e-12)
    assert report["read_stream_bytes_per_s"] > 0 and not any(key.startswith("memory_") for key in report)


def test_decode_counts_only_the_embedding_rows_it_looks_up():
    from benchmarks.decode import touched_param_bytes
    from lm_core.config import ModelConfig

    untied = ModelConfig(vocab_size=100, d_model=8, num_layers=1, num_heads=2, num_kv_heads=2, d_ff=16,
                         tie_embeddings=False)
    # one layer: q, k, v, o 4·8·8 + FFN 3·8·16 + 2 norms of 8 + final norm 8 + output 8·100, and batch·8 rows
    layer = 4 * 8 * 8 + 3 * 8 * 16 + 2 * 8
    assert touched_param_bytes(untied, batch=3) == 4 * (layer + 8 + 800 + 3 * 8)
    tied = untied.replace(tie_embeddings=True)  # the output layer reads the whole table
    assert touched_param_bytes(tied, batch=3) == 4 * (layer + 8 + 800)


def test_ttft_benchmark_reports_json():
    from benchmarks.ttft import ttft_base_config
    from kv_prediction.cost import ttft_flops
    from kv_prediction.variants import resolve_spec
    from lm_core.flops import param_counts

    result = subprocess.run([sys.executable, "-m", "benchmarks.ttft", "--json", "--prompt_lens=16",
                             "--variants=c128x1", "--repeats=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    (row,) = report["results"]
    assert (row["variant"], row["prompt_len"], row["batch"], row["repeats"]) == ("c128x1", 16, 1, 1)
    base = ttft_base_config(16 + 64)
    expected = ttft_flops(base, resolve_spec(base, "c128x1").config, 16)
    assert (row["base_flops"], row["kvp_flops"]) == (expected.base_only, expected.kvp)
    assert row["flops_reduction"] == pytest.approx(expected.reduction, rel=1e-12) and row["flops_reduction"] > 1
    assert report["base_weight_bytes"] == 4 * param_counts(base).total
    assert row["kvp_ttft_s"] > 0 and row["base_ttft_s"] > 0 and row["aux_ttft_s"] > 0
    assert row["measured_reduction"] == pytest.approx(row["base_ttft_s"] / row["kvp_ttft_s"], rel=1e-12)
    assert row["measured_over_flops"] == pytest.approx(row["measured_reduction"] / row["flops_reduction"], rel=1e-12)
    aux_part_s = row["base_ttft_s"] * (row["kvp_flops"] - row["null_cache_flops"]) / row["base_flops"]
    assert row["null_cache_ttft_s"] > 0 and row["flops_and_base_token_prediction"] == pytest.approx(
        row["base_ttft_s"] / (aux_part_s + row["null_cache_ttft_s"]) / row["flops_reduction"], rel=1e-12)
    weight_read_s = report["base_weight_bytes"] / report["copy_bandwidth_bytes_per_s"]
    assert row["flops_and_weight_read_prediction"] == pytest.approx(
        1 / (1 + weight_read_s * row["flops_reduction"] / row["base_ttft_s"]), rel=1e-12)
    assert 0 < row["flops_and_weight_read_prediction"] < 1
    # the target speaks of 256+ token prompts only, so a 16-token run has no worst ratio
    assert report["target"] == 0.9 and math.isnan(report["worst_measured_over_flops"])


def _torch_reference(*flags):
    """benchmarks.torch_reference's JSON report at test sizes (one torch thread: two would only slow the test)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.torch_reference", "--json", "--steps=1", "--batch=2",
                             "--seq=16", "--threads=1", *flags], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_consistent(report, mode):
    """The report's ratios are the ratios of the tokens/s it reports, and both models are the same size."""
    assert report["mode"] == mode and report["threads"] == 1
    assert report["tokens_per_s"] == pytest.approx(report["tokens_per_s_by_threads"]["1"], rel=1e-9)
    assert report["tokens_per_s"] == pytest.approx(2 * 16 / report["step_s"], rel=1e-9)
    assert report["jax_tokens_per_s"] == pytest.approx(2 * 16 / report["jax_step_s"], rel=1e-9)
    assert report["jax_over_torch"] == pytest.approx(report["jax_tokens_per_s"] / report["tokens_per_s"], rel=1e-9)
    assert report["tokens_per_s"] > 0 and report["jax_tokens_per_s"] > 0
    # the same model in both frameworks: 5,261,568 parameters, as lm_core.flops counts them
    assert report["torch_params"] == report["jax_params"] == report["formula_params"] == 5_261_568


def test_torch_reference_times_each_framework_in_its_own_process():
    pytest.importorskip("torch")
    report = _torch_reference("--rounds=1", "--no_compile")
    _assert_consistent(report, "processes")
    assert report["rounds"] == 1
    assert report["rounds_tokens_per_s"]["torch_eager:1"] == [report["tokens_per_s"]]
    assert report["rounds_tokens_per_s"]["jax"] == [report["jax_tokens_per_s"]]
    assert report["torch_compile_tokens_per_s"] is None and report["jax_over_torch_compile"] is None
    assert report["torch_compile_error"] == "skipped (--no_compile)"


def test_torch_reference_reports_a_failed_torch_compile_as_null_with_its_reason():
    pytest.importorskip("torch")
    # no torch.compile process starts, let alone compiles, in 0.1 s: it is stopped and counts as failed
    report = _torch_reference("--rounds=1", "--torch_only", "--compile_timeout=0.1")
    assert report["tokens_per_s"] > 0 and "jax_tokens_per_s" not in report
    assert report["torch_compile_tokens_per_s"] is None and report["rounds_tokens_per_s"]["torch_compile:1"] == []
    assert report["torch_compile_error"] == "torch_compile:1 failed: its process took longer than 0.1 s"


def test_torch_reference_interleaved_mode_times_both_in_one_process():
    pytest.importorskip("torch")
    report = _torch_reference("--mode=interleaved")
    _assert_consistent(report, "interleaved")
    assert report["torch_compile_tokens_per_s"] is None and "interleaved" in report["torch_compile_error"]


@pytest.mark.parametrize("flag, named", [("--mode=threads", "'threads'"), ("--rounds=0", "0"),
                                         ("--compile_timeout=nan", "nan"), ("--threads=0", "'0'")])
def test_torch_reference_bad_argument_exits_2_with_one_line(flag, named):
    result = subprocess.run([sys.executable, "-m", "benchmarks.torch_reference", flag], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and named in line


def test_torch_reference_without_torch_exits_2_with_one_line():
    # sys.modules["torch"] = None makes `import torch` fail as if it were not installed
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['torch_reference']; "
            "runpy.run_module('benchmarks.torch_reference', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "PyTorch" in result.stderr


def test_moe_benchmark_reports_json():
    result = subprocess.run([sys.executable, "-m", "benchmarks.moe", "--json", "--batch=2", "--seq=32", "--repeats=1",
                             "--profile"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["variant"], report["tokens"], report["d_model"], report["d_ff"]) == ("moe_4t4i", 64, 256, 688)
    assert report["dense_s"] > 0
    for prefix in ("", "bounded_"):
        assert report[f"{prefix}moe_s"] > 0
        assert report[f"{prefix}ratio"] == pytest.approx(report[f"{prefix}moe_s"] / report["dense_s"], rel=1e-12)
    # equal active FLOPs up to the routers: 2·3·256·688 per token dense; moe_4t4i adds 2·256·4 per group, half the
    # tokens in each
    assert report["dense_flops_per_token"] == 2 * 3 * 256 * 688
    assert report["moe_active_flops_per_token"] == report["dense_flops_per_token"] + 2 * 256 * 4
    # default slots compute every expert twice over on a 50/50 batch, the 0.5-bounded slots once (routers: all tokens)
    assert report["moe_executed_flops_per_token"] == 2 * report["dense_flops_per_token"] + 2 * 2 * 256 * 4
    assert report["bounded_moe_executed_flops_per_token"] == report["dense_flops_per_token"] + 2 * 2 * 256 * 4
    assert report["profile_default"]["slots"] == 2 * report["profile_bounded"]["slots"]
    pieces = {"router_scores", "top_k_route", "gather", "expert_swiglus", "scatter_add", "whole_group",
              "dense_same_rows"}
    for setting in ("default", "bounded"):
        profile = report[f"profile_{setting}"]
        assert profile.keys() == {"experts", "slots", *pieces} and profile["experts"] == 4  # the text group's
        assert all(profile[piece] > 0 for piece in pieces)


def test_torch_reference_model_computes_what_lm_core_computes():
    """With lm_core's weights copied in, the PyTorch bench model gives the same logits: the two benchmarks time the
    same function, not merely models of the same size."""
    torch = pytest.importorskip("torch")
    import numpy as np
    from flax import nnx

    from benchmarks import torch_model
    from lm_core.config import ModelConfig
    from lm_core.model import Transformer

    config = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, max_seq_len=16, tie_embeddings=False)
    jax_model = Transformer(config, rngs=nnx.Rngs(0))
    reference = torch_model.Transformer(config)

    def copy(target, value, transpose_to=None):
        array = np.asarray(value[...], np.float32)
        if transpose_to is not None:  # lm_core kernels are [in..., out...]; nn.Linear weights are [out, in]
            array = array.reshape(transpose_to).T
        target.data.copy_(torch.tensor(np.ascontiguousarray(array)))

    d, width = config.d_model, config.num_heads * config.head_dim
    copy(reference.embedding.weight, jax_model.embedding.table)
    for block, ref in zip(jax_model.blocks, reference.blocks, strict=True):
        copy(ref.attention_norm.weight, block.attention_norm.scale)
        copy(ref.ffn_norm.weight, block.ffn_norm.scale)
        # the fused qkv weight is [queries; keys; values] stacked along its output rows
        fused = np.concatenate([np.asarray(getattr(block.attention, f"{name}_proj")[...], np.float32)
                                .reshape(d, width) for name in ("query", "key", "value")], axis=1)
        copy(ref.attention.qkv.weight, fused, fused.shape)
        copy(ref.attention.out.weight, block.attention.out_proj, (width, d))
        for name in ("gate", "up", "down"):
            copy(getattr(ref.ffn, name).weight, getattr(block.ffn, name), getattr(block.ffn, name).shape)
    copy(reference.final_norm.weight, jax_model.final_norm.scale)
    copy(reference.output.weight, jax_model.output, (d, config.vocab_size))

    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    expected = np.asarray(jax_model(tokens.astype(np.int32)).logits)
    with torch.no_grad():
        actual = reference(torch.from_numpy(tokens)).numpy()
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=2e-4)


def test_accelerator_benchmark_on_cpu_exits_2_with_one_line():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: benchmarks.accelerator needs a GPU or TPU; this machine's JAX backend is cpu "
        "(use benchmarks.train_step on a CPU)"]


def _tiny_accelerator_sizes():
    """benchmarks.accelerator's parts at CPU-test sizes (the real run's structure: bf16, remat, scan, chunked loss)."""
    from benchmarks.accelerator import Sizes
    from lm_core.config import ModelConfig

    dense = ModelConfig(vocab_size=256, d_model=32, num_layers=1, num_heads=2, head_dim=16, d_ff=64, max_seq_len=16,
                        tie_embeddings=False, dtype="bfloat16", param_dtype="float32",
                        remat="dots_with_no_batch_dims_saveable", scan_layers=True)
    moma = dense.replace(qk_norm=True, remat="full", scan_layers=False)
    return Sizes(dense, moma, seq=16, per_device_batch=1, moma_per_device_batch=1, loss_chunk_tokens=32,
                 codebook_size=16, kvp_prompt_len=16, kvp_spec="c16x1", warmup=1, steps=1)


def _assert_train_step_report(result, flops_per_token, peak_flops_per_s):
    """One benchmarks.accelerator train-step part: its rate, MFU and FLOPs agree with each other and the formula."""
    import jax

    assert result["global_batch"] == jax.device_count() and result["seq"] == 16
    assert result["flops_per_token"] == pytest.approx(flops_per_token, rel=1e-12)
    assert result["tokens_per_s"] == pytest.approx(result["global_batch"] * 16 / result["step_s"], rel=1e-12)
    assert result["mfu"] == pytest.approx(result["tokens_per_s"] * flops_per_token / peak_flops_per_s, rel=1e-12)
    assert result["step_s"] > 0 and result["compile_s"] > 0 and math.isfinite(result["loss"])


@pytest.mark.slow
def test_accelerator_benchmark_runs_every_part_at_tiny_sizes(monkeypatch, capsys):
    """main() as on a GPU (backend check bypassed, tiny sizes): every part through lm_core/moma/kvp's real code on
    the 8 fake CPU devices, reported as one JSON object."""
    import jax

    from benchmarks import accelerator
    from experiments.moma.task import training_flops_per_token
    from lm_core.flops import param_counts

    monkeypatch.setattr(accelerator, "backend", lambda: "gpu")
    monkeypatch.setattr(accelerator, "default_sizes", lambda *args, **kwargs: _tiny_accelerator_sizes())
    monkeypatch.setattr(sys, "argv", ["accelerator", "--json"])
    accelerator.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["backend"] == "gpu" and report["num_devices"] == jax.device_count() and report["skipped"] == []
    sizes, peak = _tiny_accelerator_sizes(), report["peak_flops_per_s"]
    dense = report["dense_1b"]
    assert set(dense) == {"xla_blocked", "dot_product"}
    # 3 x (q,k,v,o 2·32·16·8 + scores 4·2·16·(16+1)/2 + FFN 2·3·32·64 + output 2·32·256) for one layer
    dense_flops_per_token = 3 * (8_192 + 1_088 + 12_288 + 16_384)
    for result in dense.values():
        assert "error" not in result, result
        _assert_train_step_report(result, dense_flops_per_token, peak)
        assert result["params"] == 2 * 256 * 32 + (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32  # untied: V·d twice
    moma = report["moma_4t4i_vs_dense"]
    assert set(moma) == {"dense", "moe_4t4i", "tokens_per_s_ratio"}, moma
    for name in ("dense", "moe_4t4i"):
        assert "error" not in moma[name], moma[name]
        config = accelerator.moma_run_config(sizes.moma, name, sizes.seq, sizes.codebook_size, sizes.loss_chunk_tokens)
        _assert_train_step_report(moma[name], training_flops_per_token(config), peak)
    assert moma["moe_4t4i"]["flops_per_token"] > moma["dense"]["flops_per_token"]  # the same FFN width + routers
    assert moma["moe_4t4i"]["slot_overflow"] == 0  # the batch's 75% image share fits moma_tiny's slot bounds
    assert moma["tokens_per_s_ratio"] == pytest.approx(
        moma["moe_4t4i"]["tokens_per_s"] / moma["dense"]["tokens_per_s"], rel=1e-12)
    kvp = report["kvp_ttft_16"]
    assert "error" not in kvp, kvp
    assert kvp["kvp_ttft_s"] > 0 and kvp["base_ttft_s"] > 0 and kvp["flops_reduction"] > 1
    assert kvp["flops_reduction"] == pytest.approx(kvp["base_flops"] / kvp["kvp_flops"], rel=1e-12)
    assert kvp["measured_reduction"] == pytest.approx(kvp["base_ttft_s"] / kvp["kvp_ttft_s"], rel=1e-12)
    assert kvp["base_params"] == param_counts(accelerator.kvp_base_config(sizes.dense, 16)).total
    assert kvp["aux_params"] < kvp["base_params"]
    assert report["elapsed_s"] > 0 and report["peak_memory_bytes"] > 0
    lines = accelerator.report_lines(report)  # the human-readable form of the same report
    assert sum(line.startswith("dense 1B") for line in lines) == 2 and any("KVP TTFT" in line for line in lines)
    assert any(line.startswith("MoMa moe_4t4i / dense tokens/s") for line in lines)


def test_accelerator_benchmark_skips_what_the_budget_cannot_fit_and_reports_errors():
    from benchmarks.accelerator import Budget, attempt, report_lines, run_all

    budget = Budget(0.0)
    result = run_all(_tiny_accelerator_sizes(), ("xla_blocked", "dot_product"), 1e12, budget)
    assert result["dense_1b"] == {} and result["moma_4t4i_vs_dense"] == {} and "kvp_ttft_16" not in result
    assert [note.split(":")[0] for note in result["skipped"]] == [
        "dense_1b/xla_blocked", "dense_1b/dot_product", "moma/dense", "moma/moe_4t4i", "kvp_ttft_16"]
    failed = attempt(lambda: 1 / 0)
    assert failed == {"error": "ZeroDivisionError: division by zero"}
    result.update(backend="gpu", num_devices=1, device_kind="NVIDIA H200", peak_flops_per_s=989e12,
                  peak_source="table", peak_memory_bytes=0, kvp_ttft_16=failed)
    result["dense_1b"]["splash"] = result["moma_4t4i_vs_dense"]["moe_4t4i"] = failed
    lines = report_lines(result)
    assert sum("ZeroDivisionError" in line for line in lines) == 3
    assert sum(line.startswith("skipped ") for line in lines) == 5


def test_data_benchmark_reports_json_and_the_required_rate_of_the_sweeps_smallest_model():
    import math

    from experiments.configs.vocab_sweep_small import get_config
    from experiments.vocab_scaling.runner import parse_groups
    from lm_core import flops
    from vocab_scaling.sweep import ModelGroup

    result = subprocess.run([sys.executable, "-m", "benchmarks.data", "--json", "--tokenizer=byte", "--seq_len=64",
                             "--batch_size=4", "--batches=2", "--warmup=1", "--repeats=1", "--device=a100",
                             "--mfu=0.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rates = ("on_the_fly_tokens_per_s", "prepared_tokens_per_s", "required_tokens_per_s")
    for key in (*rates, "prepare_seconds", "prepared_vs_on_the_fly", "prepared_vs_required"):
        assert math.isfinite(report[key]) and report[key] > 0, (key, report)
    assert report["prepared_vs_on_the_fly"] == report["prepared_tokens_per_s"] / report["on_the_fly_tokens_per_s"]
    assert report["prepared_vs_required"] == report["prepared_tokens_per_s"] / report["required_tokens_per_s"]
    for against in ("on_the_fly", "required"):
        assert report[f"prepared_vs_{against}_verdict"].startswith("prepared / ")
    assert (report["seq_len"], report["batch_size"], report["tokenizer"], report["vocab_size"]) == (64, 4, "byte", 260)
    assert report["on_the_fly_batches"] == report["prepared_batches"] == report["prepared_stream_batches"] == 2
    # vocab_sweep_small's smallest group, d256L4 (4 heads of 64, d_ff 704), at its smallest V=1024 and seq 512
    config = get_config()
    group = parse_groups(config.sweep.groups)[0]
    assert group == ModelGroup("d256L4", 256, 4, 4, 704) and report["model"] == "d256L4 V=1024"
    model = group.model_config(min(config.sweep.vocab_sizes), 512)
    per_token = flops.flops_per_token(model, 512).training
    # 3 x (q,k,v,o 2·4·256·64·16 + scores 4·4·4·64·(512+1)/2 + FFN 2·4·3·256·704 + output 2·256·1024)
    assert per_token == 3 * (2_097_152 + 1_050_624 + 4_325_376 + 524_288) == report["training_flops_per_token"]
    assert report["required_tokens_per_s"] == pytest.approx(312e12 * 0.5 / per_token, rel=1e-12)  # A100 bf16 dense


def test_data_benchmark_bad_arguments_exit_2_with_one_line():
    for argument, fragment in (("--device=h300", "argument --device: unknown device 'h300'; valid: "),
                               ("--mfu=1.5", "argument --mfu: 1.5 must be in (0, 1]")):
        result = subprocess.run([sys.executable, "-m", "benchmarks.data", argument], cwd=REPO, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2 and result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {fragment}"), result.stderr
