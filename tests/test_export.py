"""ONNX export: onnxruntime agrees with PyTorch for every model kind; predict and bench take the .onnx file."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

from cnnrnn import bench, build, export
from cnnrnn.cli import compose_config
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.fashion_mnist import CLASSES, splits
from cnnrnn.engine import load_checkpoint, save_checkpoint
from cnnrnn.tasks import to_input
from test_predict import composites, run_predict

TINY = {"lstm": ["model.hidden=16"], "cnn": ["model.channels=[4,8]", "model.hidden=16"],
        "multilabel_bce": ["model.channels=[4,8]", "model.cell_dim=16"],
        "multilabel": ["model.channels=[4,8]", "model.cell_dim=16", "model.hidden=32", "model.embed=8",
                       "model.attn_dim=16"]}


@pytest.fixture
def onnx_ready():
    reason = "the [export] extras are not installed: pip install 'cnnrnn[export]'"
    pytest.importorskip("onnx", reason=reason)
    pytest.importorskip("onnxruntime", reason=reason)


TRAINED: dict[str, dict] = {}  # the fake data are the same in every test: train the decoder once per session


def briefly_train(model, cfg, root, steps: int = 10) -> None:
    """A few optimizer steps on fake composites: an untrained decoder names one label and stops, which would
    leave the emission order and the END mask untested."""
    if "multilabel" in TRAINED:
        model.load_state_dict(TRAINED["multilabel"])
        return
    data = splits(root, val_size=100)
    src = CompositeSource(data["train"], 50 * steps, seed=1, fixed=True)
    task = build.task(cfg, data["train"].labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    model.train()
    for i in range(steps):
        loss, _ = task.loss(model, src.batch(src.order(None)[50 * i: 50 * (i + 1)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    TRAINED["multilabel"] = {k: v.clone() for k, v in model.state_dict().items()}


def tiny_checkpoint(path, task: str, root, *extra: str, task_state: dict | None = None):
    """A tiny model's complete checkpoint (seeded; the decoder briefly trained), and that model in eval mode."""
    cfg = compose_config([f"task={task}", f"data.root={root}", *TINY[task], *extra])
    torch.manual_seed(0)
    model = build.model(cfg)
    if task == "multilabel":
        briefly_train(model, cfg, root)
    model.eval()
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "classes": list(CLASSES),
                           "task_state": task_state or {}})
    return model


def images_for(task: str, root, n: int = 12) -> torch.Tensor:
    """Test items (single-label) or test composites, n of them: another batch size than the export's 2."""
    if task in ("lstm", "cnn"):
        return splits(root, val_size=100)["test"].images[:n]
    return composites(root, n)["image"]


@pytest.mark.parametrize("task", ["lstm", "cnn", "multilabel_bce", "multilabel"])
@pytest.mark.parametrize("tta", [False, True])
def test_onnxruntime_agrees_with_pytorch(onnx_ready, fake_root, tmp_path, task, tta):
    from cnnrnn.exported import OnnxModel

    if tta and task == "lstm":
        pytest.skip("the flips are the same tensor op for every model; lstm without them is enough")
    model = tiny_checkpoint(tmp_path / "m.pt", task, fake_root, f"eval.tta={str(tta).lower()}")
    path, note = export.export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    assert "the same labels" in note
    onnx_model = OnnxModel(path)
    images = images_for(task, fake_root)
    out = onnx_model.run(images)
    x = to_input(images)
    with torch.no_grad():
        if task in ("lstm", "cnn"):
            logits = model(x)
            assert torch.allclose(torch.from_numpy(out["logits"]), logits, atol=1e-4, rtol=0)
            probs = logits.softmax(1) if not tta else (logits.softmax(1) + model(x.flip(-1)).softmax(1)) / 2
            assert torch.allclose(torch.from_numpy(out["scores"]), probs, atol=1e-4, rtol=0)
        elif task == "multilabel_bce":
            scores = model(x).sigmoid() if not tta else (model(x).sigmoid() + model(x.flip(-1)).sigmoid()) / 2
            assert torch.allclose(torch.from_numpy(out["scores"]), scores, atol=1e-4, rtol=0)
        else:
            ref = model.generate(x, flip=tta)
            tokens = torch.from_numpy(out["tokens"])
            assert tokens.shape == (len(images), 5) and torch.equal(tokens, ref["tokens"])  # same labels, same order
            assert torch.allclose(torch.from_numpy(out["scores"]), ref["scores"], atol=1e-4, rtol=0)
            lengths = (tokens < len(CLASSES)).sum(1)
            assert lengths.min() < lengths.max() and lengths.max() >= 2  # a real test: sets of several sizes


def test_metadata_says_everything_an_onnx_user_needs(onnx_ready, fake_root, tmp_path):
    import onnxruntime as ort

    tiny_checkpoint(tmp_path / "m.pt", "multilabel_bce", fake_root, task_state={"threshold": 0.37})
    export.main([str(tmp_path / "m.pt"), str(tmp_path / "m.onnx"), "--opset", "17"])
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == list(CLASSES) and json.loads(meta["threshold"]) == 0.37
    assert json.loads(meta["input"])["shape"] == ["batch", 56, 56] and "light item on black" in meta["input"]
    assert json.loads(meta["config"])["task"] == "multilabel_bce" and "scaling" in json.loads(meta["input"])
    inp = session.get_inputs()[0]
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape == ["batch", 56, 56]


@pytest.mark.parametrize("task", ["cnn", "multilabel_bce", "multilabel"])
def test_predict_on_the_onnx_file_equals_predict_on_its_checkpoint(onnx_ready, fake_root, tmp_path, capsys, task):
    ckpt, onnx_file = tmp_path / "m.pt", tmp_path / "m.onnx"
    tiny_checkpoint(ckpt, task, fake_root, task_state={"threshold": 0.45} if task == "multilabel_bce" else None)
    export.export_checkpoint(ckpt, onnx_file)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images_for(task, fake_root)):
        Image.fromarray(img.numpy()).save(folder / f"{i:02d}.png")
    code, from_ckpt, err = run_predict(capsys, ckpt, folder)
    assert code == 0, err
    code, from_onnx, err = run_predict(capsys, onnx_file, folder)
    assert code == 0, err
    assert len(from_onnx) == len(from_ckpt) == 12
    for a, b in zip(from_onnx, from_ckpt):
        assert (a["image"], a["labels"], list(a["scores"])) == (b["image"], b["labels"], list(b["scores"]))
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_missing_extras_and_bad_files_are_refused_in_one_sentence(fake_root, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "m.pt"
    tiny_checkpoint(ckpt, "cnn", fake_root)
    monkeypatch.setitem(sys.modules, "onnx", None)          # import onnx now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(ckpt), str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "needs the onnx package" in err and "cnnrnn[export]" in err
    code, _, err = run_predict(capsys, tmp_path / "m.onnx", tmp_path)
    assert code == 2 and "needs the onnxruntime package" in err and "Traceback" not in err
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(ckpt), str(tmp_path / "m.txt")])
    assert exit_info.value.code == 2 and "does not end in .onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(ckpt), str(tmp_path / "m.onnx"), "--opset", "99"])
    assert exit_info.value.code == 2 and "--opset 99 is outside" in capsys.readouterr().err


def test_predict_refuses_a_broken_or_foreign_onnx_file(onnx_ready, tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    code, _, err = run_predict(capsys, tmp_path / "broken.onnx", tmp_path)
    assert code == 2 and "is not a readable ONNX model" in err
    node = helper.make_node("Identity", ["images"], ["scores"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 28, 28])],
                          [helper.make_tensor_value_info("scores", TensorProto.UINT8, [1, 28, 28])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "other.onnx"))
    code, _, err = run_predict(capsys, tmp_path / "other.onnx", tmp_path)
    assert code == 2 and "not one written by cnnrnn" in err


def test_bench_reports_onnxruntime_beside_pytorch(onnx_ready, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: 100.0)     # the model rows are what is tested
    monkeypatch.setattr(bench, "bench_composites", lambda: 1000.0)
    out = tmp_path / "bench.json"
    bench.main(["--models", "cnn,cnn_rnn", "--batch-sizes", "4", "--steps", "1", "--repeats", "1", "--onnx",
                "--json", str(out)])
    records = [r for r in json.loads(out.read_text()) if r["model"] != "composites"]
    assert [r["model"] for r in records] == ["cnn", "cnn_rnn"]
    assert all(r["onnx_infer_img_per_s"] > 0 and r["infer_images_per_s"] > 0 for r in records)
    assert "onnx img/s" in capsys.readouterr().out
    monkeypatch.setattr(bench, "onnx_missing", lambda: "onnxruntime not installed (pip install 'cnnrnn[export]')")
    bench.main(["--models", "cnn", "--batch-sizes", "4", "--steps", "1", "--repeats", "1", "--onnx",
                "--json", str(out)])
    assert "--onnx: skipped, onnxruntime not installed" in capsys.readouterr().err
    assert "onnx_infer_img_per_s" not in json.loads(out.read_text())[0]


def test_exported_run_dir_checkpoint_is_the_best_one(onnx_ready, fake_root, tmp_path):
    """A run dir stands for its checkpoints/best.pt, as in evaluate and predict."""
    run_dir = tmp_path / "run"
    tiny_checkpoint(run_dir / "checkpoints" / "best.pt", "cnn", fake_root)
    path, _ = export.export_checkpoint(run_dir, tmp_path / "run.onnx")
    assert path.is_file() and load_checkpoint(run_dir)["config"]["task"] == "cnn"
