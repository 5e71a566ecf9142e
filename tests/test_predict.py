"""python -m cnnrnn.predict: JSON lines, pictures converted as training's, any grid up to 16x16, bad pictures skipped
with exit 2."""
from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from conftest import PYTHON, ROOT, cli_env, composites, run_main, write_checkpoint
from PIL import Image

from cnnrnn import inference, predict
from cnnrnn.data.fashion_mnist import CLASSES

END = len(CLASSES)


def strict(line: str) -> dict:
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the output"))


def run_predict(capsys, *args) -> tuple[int, list[dict], str]:
    code, out, err = run_main(capsys, predict.main, *args)
    return code, [strict(line) for line in out.splitlines()], err


def blank(path, width: int = 28, height: int = 28) -> None:
    Image.fromarray(np.zeros((height, width), np.uint8)).save(path)


@pytest.mark.parametrize("task", ["multilabel", "multilabel_bce"])
def test_png_round_trip_gives_the_in_memory_labels(fake_root, tmp_path, capsys, task):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, task, fake_root)
    batch = composites(fake_root)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(batch["image"]):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:02d}.png")
    Image.fromarray(batch["image"][0, 0].numpy()).convert("RGB").save(tmp_path / "rgb.png")
    code, records, err = run_predict(capsys, ckpt, folder, tmp_path / "rgb.png")
    assert code == 0, err
    expected, scores = inference.load(str(ckpt)).infer(batch["image"])
    assert [r["labels"] for r in records[:-1]] == [[CLASSES[i] for i in e] for e in expected]
    printed = torch.tensor([list(r["scores"].values()) for r in records[:-1]])
    assert torch.allclose(printed, scores, atol=1e-6)          # rounded to 6 digits in the JSON line
    assert records[-1]["labels"] == records[0]["labels"]  # RGB is converted to the same gray image
    assert records[0]["image"].endswith("00.png") and list(records[0]["scores"]) == list(CLASSES)


def test_bad_images_are_reported_and_the_rest_predicted(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    good, wrong_size, not_image = tmp_path / "good.png", tmp_path / "big.png", tmp_path / "notes.png"
    blank(good)
    blank(wrong_size, 30, 30)
    not_image.write_text("not an image")
    (tmp_path / "empty").mkdir()
    code, records, err = run_predict(capsys, ckpt, not_image, wrong_size, good, tmp_path / "empty")
    assert code == 2 and [r["image"] for r in records] == [str(wrong_size), str(good)]  # any size: converted
    assert "notes.png is not a readable image" in err and "empty holds no picture files" in err
    assert "Traceback" not in err and all(line.startswith("error: ") for line in err.splitlines())


def test_8_bit_16_bit_and_float_images_of_one_composite_give_one_prediction(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "multilabel", fake_root)
    pixels = composites(fake_root, 1)["image"][0, 0].numpy()
    Image.fromarray(pixels).save(tmp_path / "a8.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "a16.png")        # 16-bit PNG ("I;16")
    Image.fromarray(pixels.astype(np.float32) / 255).save(tmp_path / "af01.tif")      # float in [0, 1]
    Image.fromarray(pixels.astype(np.int32) * 257).save(tmp_path / "ai32.tif")        # 32-bit int, 16-bit range
    assert Image.open(tmp_path / "a16.png").mode == "I;16" and Image.open(tmp_path / "af01.tif").mode == "F"
    code, records, err = run_predict(capsys, ckpt, tmp_path / "a8.png", tmp_path / "a16.png",
                                     tmp_path / "af01.tif", tmp_path / "ai32.tif")
    assert code == 0 and err == "", err
    assert len(records) == 4
    for r in records[1:]:
        assert r["labels"] == records[0]["labels"] and r["scores"] == records[0]["scores"], r["image"]


def test_a_float_image_is_read_in_0_to_1_and_beyond_that_clipped(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:9, 4:24] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels.astype(np.float32) * 4 - 300).save(tmp_path / "odd.tif")  # -300 .. 720
    code, records, err = run_predict(capsys, ckpt, tmp_path / "a.png", tmp_path / "odd.tif")
    assert code == 0 and records[0]["scores"] == records[1]["scores"] and err == ""


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height: Pillow's size guard fires on the header, before any pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_bomb_sized_and_other_bad_images_are_skipped_and_the_rest_predicted(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    good = tmp_path / "good.png"
    blank(good)
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))      # over twice the limit: Pillow's error
    (tmp_path / "bomb_warning.png").write_bytes(png_header(10_000, 10_000))  # over the limit: Pillow's warning
    Image.fromarray(np.full((28, 28), np.nan, np.float32)).save(tmp_path / "nan.tif")
    os.mkfifo(tmp_path / "fifo.png")  # would block a reader forever
    names = ["bomb.png", "bomb_warning.png", "nan.tif", "fifo.png"]
    code, records, err = run_predict(capsys, ckpt, *[tmp_path / n for n in names], good)
    assert code == 2 and [r["image"] for r in records] == [str(good)]
    lines = err.splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") and line.endswith(".") for line in lines), err
    assert all(any(n in line for line in lines) for n in names)
    assert "too many to read safely" in err
    assert "holds NaN or infinite pixels" in err and "is not a regular file" in err


def test_a_nan_score_skips_that_image_and_the_output_stays_json(fake_root, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    for name in "abc":
        blank(tmp_path / f"{name}.png")
    real_load = inference.load

    def load(*args):
        loaded = real_load(*args)
        infer = loaded.infer

        def nan_for_b(images):
            labels, scores = infer(images)
            scores[1, 3] = float("nan")
            return labels, scores
        return dataclasses.replace(loaded, infer=nan_for_b)

    monkeypatch.setattr(inference, "load", load)
    code, records, err = run_predict(capsys, ckpt, *[tmp_path / f"{n}.png" for n in "abc"])
    assert code == 2 and [r["image"] for r in records] == [str(tmp_path / f"{n}.png") for n in "ac"]
    assert err.strip() == (f"error: {tmp_path / 'b.png'}: the model gave NaN or infinite scores for this picture, "
                           f"so it has no prediction; check the picture and the checkpoint.")


def test_a_multi_label_checkpoint_reads_any_multiple_of_28_and_converts_other_sizes(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "multilabel", fake_root, bias={END: -50.0})     # END never likely: one label per cell
    images = composites(fake_root, 2, grid=3)["image"]
    big, wide, odd = tmp_path / "big.png", tmp_path / "wide.png", tmp_path / "odd.png"
    Image.fromarray(images[0, 0].numpy()).save(big)
    Image.fromarray(images[1, 0, :56].numpy()).save(wide)              # 84 wide, 56 high: 2 x 3 cells
    blank(odd, 70, 70)                                                  # made the training pictures' 56x56
    blank(tmp_path / "huge.png", 17 * 28, 17 * 28)                      # beyond 16x16 cells: made 56x56 too
    code, records, err = run_predict(capsys, ckpt, big, odd, wide, tmp_path / "huge.png")
    assert code == 0 and err == "" and [len(r["labels"]) for r in records] == [9, 4, 6, 4]
    code, records, err = run_predict(capsys, ckpt, odd, "--max-items", "3")
    assert code == 0 and len(records) == 1 and len(records[0]["labels"]) <= 3


def test_a_multiset_model_repeats_labels_and_adds_counts(fake_root, tmp_path, capsys):
    ckpt, png = tmp_path / "m.pt", tmp_path / "p.png"
    write_checkpoint(ckpt, "multilabel", fake_root, bias={2: 20.0, END: -50.0}, model={"target": "multiset"})
    blank(png, 84, 56)  # 2 x 3 cells
    code, records, _ = run_predict(capsys, ckpt, png)
    assert code == 0 and records[0]["labels"] == ["Pullover"] * 6 and records[0]["counts"] == {"Pullover": 6}


def test_max_items_is_for_the_decoder_and_at_least_one(fake_root, tmp_path, capsys):
    write_checkpoint(tmp_path / "cnn.pt", "cnn", fake_root)
    write_checkpoint(tmp_path / "m.pt", "multilabel", fake_root)
    blank(tmp_path / "a.png", 56, 56)
    code, _, err = run_predict(capsys, tmp_path / "cnn.pt", tmp_path / "a.png", "--max-items", "2")
    assert code == 2 and "--max-items caps the label decoder, but" in err and "task=cnn model; drop it." in err
    code, _, err = run_predict(capsys, tmp_path / "m.pt", tmp_path / "a.png", "--max-items", "0")
    assert code == 2 and err == "error: --max-items 0 must be at least 1.\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")
def test_cuda_without_a_gpu_is_one_sentence(tmp_path, capsys):
    code, _, err = run_predict(capsys, tmp_path / "never-read.pt", "x.png", "--device", "cuda")
    assert code == 2 and err.strip() == "error: --device cuda, but no CUDA device is available here; use --device cpu."


def test_predict_on_the_onnx_file_equals_predict_on_its_checkpoint(fake_root, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the [export] extras are not installed")
    from cnnrnn import export

    ckpt, onnx_file = tmp_path / "m.pt", tmp_path / "m.onnx"
    write_checkpoint(ckpt, "multilabel_bce", fake_root, task_state={"threshold": 0.45})
    export.export_checkpoint(ckpt, onnx_file)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(composites(fake_root)["image"]):
        Image.fromarray(img[0].numpy()).save(folder / f"{i:02d}.png")
    code, from_ckpt, err = run_predict(capsys, ckpt, folder)
    assert code == 0, err
    code, from_onnx, err = run_predict(capsys, onnx_file, folder)
    assert code == 0, err
    assert len(from_onnx) == len(from_ckpt) == 12
    for a, b in zip(from_onnx, from_ckpt):
        assert (a["image"], a["labels"], list(a["scores"])) == (b["image"], b["labels"], list(b["scores"]))
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


@pytest.mark.slow
def test_output_piped_into_head_ends_quietly(fake_root, tmp_path):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    folder = tmp_path / "many"
    folder.mkdir()
    blank(folder / "0000.png")
    for i in range(1, 600):  # ~200 KB of lines: more than a pipe holds, so the writer meets the closed end
        os.link(folder / "0000.png", folder / f"{i:04d}.png")
    proc = subprocess.Popen([PYTHON, "-m", "cnnrnn.predict", str(ckpt), str(folder)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read()
    proc.wait(timeout=300)
    assert strict(first)["image"].endswith("0000.png")
    assert err == "" and proc.returncode == 1
