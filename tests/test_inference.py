"""Predictions from a checkpoint or an .onnx file: the same either way; foreign files refused in one sentence."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import composites, write_checkpoint

from cnnrnn import export, inference
from cnnrnn.data import fashion_mnist
from cnnrnn.data.fashion_mnist import CLASSES
from cnnrnn.errors import UserError


def test_a_checkpoint_says_what_it_reads_and_names(fake_root, tmp_path):
    write_checkpoint(tmp_path / "cnn.pt", "cnn", fake_root)
    single = inference.load(str(tmp_path / "cnn.pt"))
    assert (single.side, single.classes, single.composite, single.multiset) == (28, CLASSES, False, False)
    labels, scores = single.infer(torch.zeros(3, 28, 28, dtype=torch.uint8))
    assert len(labels) == 3 and all(len(row) == 1 for row in labels) and scores.shape == (3, 10)
    write_checkpoint(tmp_path / "m.pt", "multilabel", fake_root, model={"target": "multiset"})
    multi = inference.load(str(tmp_path / "m.pt"), max_items=2)
    assert (multi.side, multi.composite, multi.multiset) == (56, True, True)
    labels, scores = multi.infer(torch.randint(0, 255, (4, 84, 84), dtype=torch.uint8))
    assert all(len(row) <= 2 for row in labels) and scores.shape == (4, 10)


def test_flags_that_do_not_fit_the_model_are_refused(fake_root, tmp_path):
    write_checkpoint(tmp_path / "cnn.pt", "cnn", fake_root)
    with pytest.raises(UserError, match="--max-items caps the label decoder, but .* holds a task=cnn model; drop it"):
        inference.load(str(tmp_path / "cnn.pt"), max_items=2)
    write_checkpoint(tmp_path / "m.pt", "multilabel", fake_root)
    with pytest.raises(UserError, match="--max-items 0 must be at least 1"):
        inference.load(str(tmp_path / "m.pt"), max_items=0)
    with pytest.raises(UserError, match="runs in onnxruntime on the CPU only; drop --device cuda"):
        inference.load(str(tmp_path / "m.onnx"), device="cuda")
    with pytest.raises(UserError, match="--max-items needs a checkpoint; .*m.onnx decodes its exported number"):
        inference.load(str(tmp_path / "m.onnx"), max_items=3)


@pytest.mark.parametrize("task", ["cnn", "multilabel"])
def test_an_onnx_file_predicts_what_its_checkpoint_predicts(onnx_ready, fake_root, tmp_path, task):
    write_checkpoint(tmp_path / "m.pt", task, fake_root)
    export.export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    images = (composites(fake_root, 12)["image"] if task == "multilabel"
              else fashion_mnist.splits(fake_root, val_size=100)["test"].images[:12])
    from_ckpt, from_onnx = inference.load(str(tmp_path / "m.pt")), inference.load(str(tmp_path / "m.onnx"))
    assert (from_onnx.side, from_onnx.classes, from_onnx.composite) == (from_ckpt.side, CLASSES, False)
    (a, sa), (b, sb) = from_ckpt.infer(images), from_onnx.infer(images)
    assert a == b and torch.allclose(sa, sb, atol=1e-4)


def test_a_broken_or_foreign_onnx_file_is_refused(onnx_ready, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    with pytest.raises(UserError, match="missing.onnx does not exist; give an .onnx file written by"):
        inference.OnnxModel(tmp_path / "missing.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a readable ONNX model"):
        inference.OnnxModel(tmp_path / "broken.onnx")
    node = helper.make_node("Identity", ["images"], ["scores"])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("images", TensorProto.UINT8, [1, 28, 28])],
                          [helper.make_tensor_value_info("scores", TensorProto.UINT8, [1, 28, 28])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(UserError, match="is an ONNX model but not one written by cnnrnn"):
        inference.OnnxModel(tmp_path / "other.onnx")
    entry = model.metadata_props.add()
    entry.key, entry.value = "format", "cnnrnn-onnx/1"
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(UserError, match="carries cnnrnn metadata that this version cannot use .*export its "
                                        "checkpoint again"):
        inference.OnnxModel(tmp_path / "old.onnx")


def test_metadata_of_an_exported_file_must_be_complete(onnx_ready, fake_root, tmp_path):
    import onnx

    write_checkpoint(tmp_path / "m.pt", "cnn", fake_root)
    export.export_checkpoint(tmp_path / "m.pt", tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    for entry in model.metadata_props:
        if entry.key == "data":
            entry.value = json.dumps({"classes": ["a", "b"], "colour": 1})
    onnx.save(model, str(tmp_path / "odd.onnx"))
    with pytest.raises(UserError, match="carries cnnrnn metadata that this version cannot use"):
        inference.OnnxModel(tmp_path / "odd.onnx")


def test_without_onnxruntime_an_onnx_file_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)          # import onnxruntime now raises ImportError
    with pytest.raises(UserError, match="needs the onnxruntime package, which is not installed; install it with "
                                        "pip install 'cnnrnn\\[export\\]'"):
        inference.load(str(tmp_path / "m.onnx"))


def test_a_graph_that_does_not_match_its_metadata_is_refused(onnx_ready, fake_root, tmp_path):
    import onnx

    write_checkpoint(tmp_path / "cnn.pt", "cnn", fake_root)
    write_checkpoint(tmp_path / "multi.pt", "multilabel", fake_root)
    export.export_checkpoint(tmp_path / "cnn.pt", tmp_path / "cnn.onnx")
    export.export_checkpoint(tmp_path / "multi.pt", tmp_path / "multi.onnx")
    cnn, multi = onnx.load(str(tmp_path / "cnn.onnx")), onnx.load(str(tmp_path / "multi.onnx"))
    del multi.metadata_props[:]
    multi.metadata_props.extend(cnn.metadata_props)           # another task's metadata on a 56x56 graph
    onnx.save(multi, str(tmp_path / "swapped.onnx"))
    with pytest.raises(UserError, match=r"swapped.onnx's graph does not match its metadata \(it reads "
                                        r"\[\('images', 'tensor\(uint8\)', \[1, 56, 56\]\)\].*export its checkpoint again"):
        inference.OnnxModel(tmp_path / "swapped.onnx")
