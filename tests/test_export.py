"""python -m cnnrnn.export: onnxruntime's labels are PyTorch's, full metadata, refusals, whole files."""
from __future__ import annotations

import errno
import json
import logging
import sys

import pytest
import torch
from conftest import composites, make_composites, run_main, write_checkpoint

from cnnrnn import build, checkpoint, export, files
from cnnrnn.config import from_dict
from cnnrnn.data.fashion_mnist import CLASSES, FORMAT, splits
from cnnrnn.errors import UserError
from cnnrnn.inference import OnnxModel
from cnnrnn.tasks import make_task

TRAINED: dict[str, dict] = {}  # the fake data are the same in every test: train the decoder once per session


def briefly_train(model, cfg, root, steps: int = 20) -> None:
    """A few steps on fake composites, so the decoder names sets of several sizes (session-cached)."""
    if "multilabel" not in TRAINED:
        data = splits(root, val_size=100)
        src = make_composites(data["train"], 50 * steps, seed=1, fixed=True)
        task = make_task(cfg, FORMAT, data["train"].labels)
        opt = torch.optim.Adam(model.parameters(), lr=3e-2)
        model.train()
        for i in range(steps):
            loss, _ = task.loss(model, src.batch(src.order(None)[50 * i: 50 * (i + 1)]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        TRAINED["multilabel"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(TRAINED["multilabel"])


def tiny_checkpoint(path, task: str, root, tta: bool = False, task_state: dict | None = None):
    """A tiny model's complete checkpoint (seeded; the decoder briefly trained), and that model in eval mode."""
    cfg, model = write_checkpoint(path, task, root, eval={"tta": tta}, task_state=task_state)
    if task == "multilabel":
        briefly_train(model, cfg, root)
        model.eval()
        state = checkpoint.load(path)
        checkpoint.save(path, {**state, "model": model.state_dict()})
    return model


def images_for(task: str, root, n: int = 12) -> torch.Tensor:
    """Test items (single-label) or test composites, n of them: another batch size than the export's 2."""
    if task in ("lstm", "cnn"):
        return splits(root, val_size=100)["test"].images[:n]
    return composites(root, n)["image"]


@pytest.mark.parametrize("task, tta", [("lstm", False), ("cnn", False), ("cnn", True), ("multilabel_bce", False),
                                       ("multilabel_bce", True), ("multilabel", False), ("multilabel", True)])
def test_onnxruntime_agrees_with_pytorch(onnx_ready, fake_root, tmp_path, task, tta):
    model = tiny_checkpoint(tmp_path / "m.pt", task, fake_root, tta=tta)
    path, _ = export.export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    onnx_model = OnnxModel(path)
    images = images_for(task, fake_root)
    out = onnx_model.run(images)
    x = FORMAT.to_input(images)
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
    labels, _ = onnx_model.predict(images)
    assert labels == make_task(from_dict(onnx_model.config), FORMAT).labels({k: torch.from_numpy(v) for k, v in out.items()})


@pytest.mark.parametrize("task", ["lstm", "multilabel"])
def test_the_self_check_after_an_export_finds_the_same_labels(onnx_ready, fake_root, tmp_path, task):
    tiny_checkpoint(tmp_path / "m.pt", task, fake_root)
    cfg, model, kind = build.from_checkpoint(checkpoint.load(tmp_path / "m.pt"), tmp_path / "m.pt")
    export.export(model, kind, tmp_path / "m.onnx", kind.side(cfg), export.metadata(cfg, kind))
    assert not model.training                                  # the caller's model as it was given
    _, note = export.export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    assert "onnxruntime vs PyTorch on 8 random images: the same labels" in note


def test_metadata_says_everything_an_onnx_user_needs(onnx_ready, fake_root, tmp_path, capsys):
    import onnxruntime as ort

    tiny_checkpoint(tmp_path / "m.pt", "multilabel_bce", fake_root, task_state={"threshold": 0.37})
    code, _, err = run_main(capsys, export.main, tmp_path / "m.pt", tmp_path / "m.onnx", "--opset", "17")
    assert code == 0, err
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["format"] == "cnnrnn-onnx/3" and meta["kind"] == "bce" and meta["task"] == "multilabel_bce"
    assert json.loads(meta["classes"]) == list(CLASSES) and json.loads(meta["task_state"]) == {"threshold": 0.37}
    assert json.loads(meta["data"]) == FORMAT.to_dict() and "padded with the tone [0]" in meta["input"]
    assert json.loads(meta["input"])["shape"] == ["batch", 1, 56, 56]
    assert json.loads(meta["config"])["task"] == "multilabel_bce" and "scaling" in json.loads(meta["input"])
    assert set(json.loads(meta["outputs"])) == {"scores"} and meta["tta"] == "false"
    inp = session.get_inputs()[0]
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape == ["batch", 1, 56, 56]


def test_a_trained_runs_checkpoint_exports_from_the_command_line(onnx_ready, fake_root, multilabel_run, tmp_path,
                                                                caplog, capsys):
    out, _ = multilabel_run
    with caplog.at_level(logging.INFO, "cnnrnn"):
        code, _, err = run_main(capsys, export.main, out, tmp_path / "sub" / "run.onnx")  # a run dir: its best.pt
    assert code == 0, err
    assert (tmp_path / "sub" / "run.onnx").is_file()
    assert "onnxruntime vs PyTorch on 8 random images:" in caplog.text


def test_a_beam_search_model_exports_its_greedy_decoding_with_a_warning(onnx_ready, fake_root, tmp_path, caplog):
    cfg, model = write_checkpoint(tmp_path / "m.pt", "multilabel", fake_root, model={"beam_size": 3})
    with caplog.at_level(logging.WARNING, "cnnrnn"):
        path, _ = export.export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    assert "model.beam_size=3: the exported graph decodes greedily" in caplog.text
    images = images_for("multilabel", fake_root)
    tokens = torch.from_numpy(OnnxModel(path).run(images)["tokens"])
    assert torch.equal(tokens, model.generate(FORMAT.to_input(images), beam_size=1)["tokens"]) and model.beam_size == 3


def test_a_failed_write_over_an_existing_onnx_file_leaves_it_loadable(onnx_ready, fake_root, tmp_path,
                                                                     monkeypatch):
    tiny_checkpoint(tmp_path / "m.pt", "cnn", fake_root)
    path, _ = export.export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(files.os, "fsync", full)
        with pytest.raises(UserError, match=r"Cannot write .*m.onnx \(No space left on device\); the previous "
                                            r"m.onnx is intact"):
            export.export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt"]
    labels, _ = OnnxModel(path).predict(images_for("cnn", fake_root))
    assert len(labels) == 12


def test_a_run_dir_exports_its_best_checkpoint(onnx_ready, fake_root, tmp_path):
    """A run dir stands for its checkpoints/best.pt, as in evaluate and predict."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    tiny_checkpoint(run_dir / "checkpoints" / "best.pt", "cnn", fake_root)
    path, _ = export.export_checkpoint(run_dir, tmp_path / "run.onnx")
    assert path.is_file() and OnnxModel(path).config["task"] == "cnn"


def test_bad_outputs_and_inputs_are_refused_before_any_work(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    (tmp_path / "folder.onnx").mkdir()
    (tmp_path / "file").write_text("x")
    cases = [((ckpt, tmp_path / "folder.onnx"), f"error: {tmp_path / 'folder.onnx'} is a folder; give a file path, "
                                                f"e.g. {tmp_path / 'folder.onnx' / 'model.onnx'}."),
             ((ckpt, tmp_path / "file" / "m.onnx"), f"error: {tmp_path / 'file' / 'm.onnx'}: {tmp_path / 'file'} is a "
                                                    f"file, not a folder; choose another path."),
             ((tmp_path / "m.onnx", tmp_path / "out.onnx"), f"error: {tmp_path / 'm.onnx'} is already an exported "
                                                            f"ONNX model; give the checkpoint it came from "
                                                            f"(RUN_DIR/checkpoints/best.pt)."),
             ((ckpt, tmp_path / "m.txt"), f"error: {tmp_path / 'm.txt'} does not end in .onnx; name the output file "
                                          f"OUT.onnx."),
             ((ckpt, tmp_path / "m.onnx", "--opset", "99"), "error: --opset 99 is outside what this exporter writes; "
                                                            "choose 11 to 20 (default 17).")]
    for args, sentence in cases:
        code, _, err = run_main(capsys, export.main, *args)
        assert code == 2 and err.strip() == sentence
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.onnx", "m.pt"]


def test_missing_extras_are_one_sentence(fake_root, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    monkeypatch.setitem(sys.modules, "onnx", None)          # import onnx now raises ImportError
    code, _, err = run_main(capsys, export.main, ckpt, tmp_path / "m.onnx")
    assert code == 2 and "needs the onnx package" in err and "cnnrnn[export]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_ctrl_c_during_an_export_is_one_line_and_leaves_the_old_file(fake_root, tmp_path, capsys, monkeypatch):
    write_checkpoint(tmp_path / "m.pt", "cnn", fake_root)
    (tmp_path / "m.onnx").write_bytes(b"an older export")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export", interrupted)
    code, _, err = run_main(capsys, export.main, tmp_path / "m.pt", tmp_path / "m.onnx")
    assert code == 130 and err.strip() == (f"error: Interrupted; {tmp_path / 'm.onnx'} was not written (a file that "
                                           f"was there is intact).")
    assert (tmp_path / "m.onnx").read_bytes() == b"an older export"
