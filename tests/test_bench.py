"""The benchmark command: one record per model and batch size with the contract's keys."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cnnrnn import bench


def test_bench_writes_records_with_the_contract_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", "lstm,cnn_rnn", "--batch-sizes", "4", "--steps", "1", "--repeats", "1",
                "--json", str(out)])
    records = json.loads(out.read_text())
    models = [r for r in records if r["model"] != "composites"]
    assert [(r["model"], r["batch_size"]) for r in models] == [("lstm", 4), ("cnn_rnn", 4)]
    for r in models:
        for key in ("ms_per_step", "samples_per_s", "mfu", "mflops_per_sample", "gflops", "infer_images_per_s",
                    "data_share", "peak_gflops_fp32"):
            assert r[key] > 0, key
    assert models[0]["mflops_per_sample"] > 20  # the LSTM's FLOPs are counted, not just its head's
    assert records[-1]["model"] == "composites" and records[-1]["images_per_s"] > 0  # measured, whatever the speed
    assert "ms/step" in capsys.readouterr().out


def test_bench_refuses_unknown_models(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--models", "resnet"])
    assert exit_info.value.code == 2 and "unknown model 'resnet'" in capsys.readouterr().err


@pytest.mark.parametrize("args, sentence", [
    (["--steps", "0"], "--steps 0 must be at least 1."),
    (["--repeats", "-2"], "--repeats -2 must be at least 1."),
    (["--threads", "0"], "--threads 0 must be at least 1."),
    (["--batch-sizes", "32,0"], "--batch-sizes 32,0: each must be between 1 and 65,536, e.g. 32,128."),
    (["--batch-sizes", "32,,64"], "--batch-sizes 32,,64 must be comma-separated integers, e.g. 32,128."),
    (["--json", "{tmp}/missing/bench.json"], "--json {tmp}/missing/bench.json: the folder {tmp}/missing does not "
                                             "exist; create it first or choose another path."),
    (["--json", "{tmp}"], "--json {tmp} is a folder; give a file path, e.g. {tmp}/bench.json."),
    (["--onnx", "--device", "cuda"], "--onnx times onnxruntime on the CPU, beside the CPU model; run it with "
                                     "--device cpu."),
])
def test_bench_refuses_bad_arguments_before_timing_anything(tmp_path, capsys, monkeypatch, args, sentence):
    def timing(*a, **k):
        raise AssertionError("the benchmark started before the arguments were checked")

    monkeypatch.setattr(bench, "matmul_peak", timing)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: " + sentence.format(tmp=tmp_path)


REALLOCATE = """
import resource, sys, torch
from cnnrnn.engine import keep_freed_memory
kept = sys.argv[1] == "keep" and keep_freed_memory()
# warm-up: posix_memalign's padding outgrows a freed 64 MB chunk until two freed neighbours coalesce, so glibc
# takes a few rounds (up to 6 seen) to settle where the block lives; a training step is counted in steady state
for _ in range(10):
    torch.empty(1 << 24).fill_(1)                 # 64 MB
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):                               # freed and allocated again, as a step's activations are
    torch.empty(1 << 24).fill_(1)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_activations_are_reused_instead_of_faulted_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, check=True)
        kept, count = out.stdout.split()
        return kept == "True", int(count)

    kept, with_keep = faults("keep")
    if not kept:
        pytest.skip("not glibc: malloc's thresholds cannot be set here")
    _, without = faults("default")
    # by default glibc maps a 64 MB block afresh each time, even in steady state: all of its 16,384 pages fault in again
    assert without > 10 * 16_000 and with_keep < without / 2
