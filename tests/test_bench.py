"""python -m cnnrnn.bench: records with the contract's keys, onnxruntime's rate, bad arguments refused first."""
from __future__ import annotations

import json

import pytest

from cnnrnn import bench


def test_bench_writes_records_with_the_contract_keys(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--models", "lstm,cnn_rnn,cnn_rnn_picture", "--batch-sizes", "4", "--seconds", "0.01",
                "--json", str(out)])
    records = json.loads(out.read_text())
    models = [r for r in records if r["model"] != "composites"]
    assert [(r["model"], r["batch_size"]) for r in models] == [("lstm", 4), ("cnn_rnn", 4), ("cnn_rnn_picture", 4)]
    for r in models:
        for key in ("ms_per_step", "samples_per_s", "mfu", "mflops_per_sample", "gflops", "infer_images_per_s",
                    "data_share", "peak_gflops_fp32"):
            assert r[key] > 0, key
    assert models[0]["mflops_per_sample"] > 20  # the LSTM's FLOPs are counted, not just its head's
    assert models[2]["mflops_per_sample"] > models[1]["mflops_per_sample"]  # 8x8 windows read, not 2x2 cells
    assert records[-1]["model"] == "composites" and records[-1]["images_per_s"] > 0  # measured, whatever the speed
    assert "ms/step" in capsys.readouterr().out


def test_bench_refuses_unknown_models(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--models", "resnet"])
    assert exit_info.value.code == 2 and "unknown model 'resnet'" in capsys.readouterr().err


@pytest.mark.parametrize("args, sentence", [
    (["--seconds", "0"], "--seconds 0 must be more than 0 and at most 600."),
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


def test_bench_reports_onnxruntime_beside_pytorch(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime", reason="the [export] extras are not installed")
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: 100.0)     # the model rows are what is tested
    monkeypatch.setattr(bench, "bench_composites", lambda: 1000.0)
    out = tmp_path / "bench.json"
    bench.main(["--models", "cnn,cnn_rnn", "--batch-sizes", "4", "--seconds", "0.01", "--onnx",
                "--json", str(out)])
    records = [r for r in json.loads(out.read_text()) if r["model"] != "composites"]
    assert [r["model"] for r in records] == ["cnn", "cnn_rnn"]
    assert all(r["onnx_infer_img_per_s"] > 0 and r["infer_images_per_s"] > 0 for r in records)
    assert "onnx img/s" in capsys.readouterr().out
    monkeypatch.setattr(bench, "onnx_missing", lambda: "onnxruntime not installed (pip install 'cnnrnn[export]')")
    bench.main(["--models", "cnn", "--batch-sizes", "4", "--seconds", "0.01", "--onnx",
                "--json", str(out)])
    assert "--onnx: skipped, onnxruntime not installed" in capsys.readouterr().err
    assert "onnx_infer_img_per_s" not in json.loads(out.read_text())[0]
