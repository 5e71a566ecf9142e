"""Issue 11, the inference side: evaluate reproduces metrics.json; predict scales 16-bit and float images, skips bad
ones (bombs included) with exit 2, writes strict JSON and stops quietly on a closed pipe; every bad flag of
predict, evaluate, export and compare is one sentence with exit 2, before any work."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import subprocess
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cnnrnn import build, compare, evaluate, export, predict
from cnnrnn.cli import compose_config
from cnnrnn.engine import load_checkpoint, save_checkpoint
from cnnrnn.train import run
from conftest import PYTHON, ROOT, cli_env, tiny
from test_predict import composites, write_checkpoint

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present here")


def run_main(capsys, main, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def strict(line: str) -> dict:
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the output"))


def same_numbers(printed: dict, saved: dict) -> None:
    assert set(printed) == set(saved)
    for key, value in printed.items():
        if isinstance(value, float):
            assert math.isclose(value, saved[key], rel_tol=0, abs_tol=1e-6), (key, value, saved[key])
        else:
            assert value == saved[key], key


# --- evaluate reproduces the run ------------------------------------------------------------------------------

def test_evaluate_prints_every_number_of_metrics_json(fake_root, tmp_path, capsys):
    """A multi-label run (bf16) and the single-label cnn it trains for its tile oracle (RUN/oracle, a run of its
    own): evaluate's JSON line holds every number of each metrics.json."""
    out = tmp_path / "run"
    # the decoder's default sizes and two epochs: smaller runs hide the old mismatch (the weights' memory layout
    # under bf16 moved test/map by 0.01) in rounding
    run(compose_config(["task=multilabel", *tiny(fake_root, "data.test_size=100", "model.channels=[4,8]")]), out)
    for folder in (out, out / "oracle"):
        saved = json.loads((folder / "metrics.json").read_text())
        capsys.readouterr()
        code, printed, err = run_main(capsys, evaluate.main, folder / "checkpoints" / "best.pt")
        assert code == 0, err
        same_numbers(strict(printed), saved)
    assert "test/acc" in saved  # the oracle is the single-label case
    # a checkpoint written before the training class counts were kept: counted again on the run's training split
    saved = json.loads((out / "metrics.json").read_text())
    state = load_checkpoint(out / "checkpoints" / "best.pt")
    assert state["config"]["model"]["label_order"] == "frequency"
    state["task_state"] = {"order": "frequency"}
    save_checkpoint(tmp_path / "old.pt", state)
    same_numbers(evaluate.evaluate_checkpoint(tmp_path / "old.pt"), saved)


def test_a_random_label_order_scores_the_same_loss_every_time(fake_root, tmp_path):
    cfg = compose_config(["task=multilabel", *tiny(fake_root, "data.test_size=100", "model.channels=[4,8]",
                                                   "model.label_order=random")])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pt", {"model": build.model(cfg).state_dict(), "config": cfg.to_dict(),
                                        "task_state": {"class_counts": [1] * 10}})
    losses = []
    for seed in (1, 2):  # what the process drew before must not matter
        torch.manual_seed(seed)
        losses.append(evaluate.evaluate_checkpoint(tmp_path / "m.pt")["test/loss"])
    assert losses[0] == losses[1]


def test_evaluate_refusals_come_before_any_work(fake_root, tmp_path, capsys):
    single = tmp_path / "cnn.pt"
    write_checkpoint(single, "cnn", tmp_path / "no-data-here")  # a refusal must not need the data
    code, out, err = run_main(capsys, evaluate.main, single, "--oracle", single)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: --oracle scores multi-label checkpoints against the tile oracle, but {single} "
                           f"holds a single-label task=cnn model; drop --oracle.")
    code, _, err = run_main(capsys, evaluate.main, tmp_path / "model.onnx")
    assert code == 2 and "is an exported ONNX model, but evaluate reads checkpoints" in err
    multi = tmp_path / "multi.pt"
    write_checkpoint(multi, "multilabel", fake_root)
    code, _, err = run_main(capsys, evaluate.main, multi, "--oracle", tmp_path / "missing.pt")
    assert code == 2 and "missing.pt does not exist" in err and "Traceback" not in err


def test_evaluate_refuses_a_data_root_that_is_not_a_folder(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    code, _, err = run_main(capsys, evaluate.main, ckpt, "--data-root", tmp_path / "typo")
    assert code == 2 and err.strip() == (f"error: --data-root {tmp_path / 'typo'} is not a folder; give the folder "
                                         f"that holds the four Fashion-MNIST files.")


def test_evaluate_prints_strict_json():
    assert evaluate.strict_json({"test/map": float("nan"), "test/loss": float("inf"), "params": 3}) == \
        '{"test/map": null, "test/loss": null, "params": 3}'


@no_cuda
@pytest.mark.parametrize("main, args", [(evaluate.main, []), (predict.main, ["x.png"])])
def test_cuda_without_a_gpu_is_one_sentence(tmp_path, capsys, main, args):
    code, _, err = run_main(capsys, main, tmp_path / "never-read.pt", *args, "--device", "cuda")
    assert code == 2 and err.strip() == "error: --device cuda, but no CUDA device is available here; use --device cpu."


def test_a_checkpoint_with_nan_weights_is_refused_once(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "nan.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    state = load_checkpoint(ckpt)
    next(v for v in state["model"].values() if v.is_floating_point())[0] = float("nan")
    save_checkpoint(ckpt, state)
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    for main, args in ((predict.main, [tmp_path / "a.png"]), (evaluate.main, [])):
        code, out, err = run_main(capsys, main, ckpt, *args)
        assert code == 2 and out == "" and "holds NaN or infinite weights" in err


# --- predict: pixels by their real range --------------------------------------------------------------------

def test_8_bit_16_bit_and_float_images_of_one_composite_give_one_prediction(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "multilabel", fake_root)
    pixels = composites(fake_root, 1)["image"][0].numpy()
    Image.fromarray(pixels).save(tmp_path / "a8.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "a16.png")        # 16-bit PNG ("I;16")
    Image.fromarray(pixels.astype(np.float32) / 255).save(tmp_path / "af01.tif")      # float in [0, 1]
    Image.fromarray(pixels.astype(np.float32)).save(tmp_path / "af255.tif")          # float 8-bit levels
    Image.fromarray(pixels.astype(np.int32) * 257).save(tmp_path / "ai32.tif")        # 32-bit int, 16-bit range
    assert Image.open(tmp_path / "a16.png").mode == "I;16" and Image.open(tmp_path / "af01.tif").mode == "F"
    code, out, err = run_main(capsys, predict.main, ckpt, tmp_path / "a8.png", tmp_path / "a16.png",
                              tmp_path / "af01.tif", tmp_path / "af255.tif", tmp_path / "ai32.tif")
    assert code == 0 and err == "", err
    records = [strict(line) for line in out.splitlines()]
    assert len(records) == 5
    for r in records[1:]:
        assert r["labels"] == records[0]["labels"] and r["scores"] == records[0]["scores"], r["image"]


def test_a_float_image_outside_the_usual_ranges_is_stretched_with_a_warning(fake_root, tmp_path, capsys):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    pixels = np.zeros((28, 28), np.uint8)
    pixels[5:9, 4:24] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels.astype(np.float32) * 4 - 300).save(tmp_path / "odd.tif")  # -300 .. 720
    code, out, err = run_main(capsys, predict.main, ckpt, tmp_path / "a.png", tmp_path / "odd.tif")
    records = [strict(line) for line in out.splitlines()]
    assert code == 0 and records[0]["scores"] == records[1]["scores"]
    assert err.strip() == (f"warning: {tmp_path / 'odd.tif'} has float pixels from -300 to 720, outside 0-1, 0-255 "
                           f"and 0-65535; stretched from its minimum (black) to its maximum (white).")


# --- predict: bad images, NaN, pipes --------------------------------------------------------------------------

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
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(good)
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))      # over twice the limit: Pillow's error
    (tmp_path / "bomb_warning.png").write_bytes(png_header(10_000, 10_000))  # over the limit: Pillow's warning
    Image.fromarray(np.full((28, 28), np.nan, np.float32)).save(tmp_path / "nan.tif")
    os.mkfifo(tmp_path / "fifo.png")  # would block a reader forever
    names = ["bomb.png", "bomb_warning.png", "nan.tif", "fifo.png"]
    code, out, err = run_main(capsys, predict.main, ckpt, *[tmp_path / n for n in names], good)
    assert code == 2 and [strict(line)["image"] for line in out.splitlines()] == [str(good)]
    lines = err.splitlines()
    assert len(lines) == 4 and all(line.startswith("error: ") and line.endswith(".") for line in lines), err
    assert all(any(n in line for line in lines) for n in names)
    assert "has more than 89,478,485 pixels, too many to read safely" in lines[1]
    assert "holds NaN or infinite pixels" in err and "is not a regular file" in err


def test_a_nan_score_skips_that_image_and_the_output_stays_json(fake_root, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    for name in ("a", "b", "c"):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / f"{name}.png")
    real_load = predict.load

    def load(*args):
        loaded = real_load(*args)
        infer = loaded.infer

        def nan_for_b(images):
            labels, scores = infer(images)
            scores[1, 3] = float("nan")
            return labels, scores
        return dataclasses.replace(loaded, infer=nan_for_b)

    monkeypatch.setattr(predict, "load", load)
    code, out, err = run_main(capsys, predict.main, ckpt, *[tmp_path / f"{n}.png" for n in "abc"])
    assert code == 2 and [strict(line)["image"] for line in out.splitlines()] == [str(tmp_path / f"{n}.png")
                                                                                   for n in "ac"]
    assert err.strip() == (f"error: {tmp_path / 'b.png'}: the model gave NaN or infinite scores for this image, "
                           f"so it has no prediction; check the image and the checkpoint.")


def test_output_piped_into_head_ends_quietly(fake_root, tmp_path):
    ckpt = tmp_path / "m.pt"
    write_checkpoint(ckpt, "cnn", fake_root)
    folder = tmp_path / "many"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "0000.png")
    for i in range(1, 600):  # ~200 KB of lines: more than a pipe holds, so the writer meets the closed end
        os.link(folder / "0000.png", folder / f"{i:04d}.png")
    proc = subprocess.Popen([PYTHON, "-m", "cnnrnn.predict", str(ckpt), str(folder)], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert strict(first)["image"].endswith("0000.png")
    assert err == "" and proc.returncode == 1


# --- export and compare: where the output goes ---------------------------------------------------------------

def test_export_refuses_bad_outputs_and_inputs_before_any_work(fake_root, tmp_path, capsys):
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
                                                            f"(RUN_DIR/checkpoints/best.pt).")]
    for args, sentence in cases:
        code, _, err = run_main(capsys, export.main, *args)
        assert code == 2 and err.strip() == sentence


def test_compare_refuses_an_out_folder_under_a_file_before_reading_runs(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = run_main(capsys, compare.main, tmp_path / "no-such-run", "--out", tmp_path / "file" / "sub")
    assert code == 2
    assert err.strip() == (f"error: --out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, not a folder; "
                           f"choose another folder with --out.")
