"""Speed table: python -m cnnrnn.bench [--models lstm,cnn] [--batch-sizes 32,128] [--json PATH] [--onnx] [--device D].

Per model and batch size: training ms/step (forward + backward + optimizer step, the median of
torch.utils.benchmark's blocks after warm-up), samples/s, counted FLOPs per sample, achieved GFLOP/s and MFU
(against a large fp32 matmul timed in the same process), inference images/s; plus composite generation
images/s and the data path's share of a training step. With --onnx, also the inference images/s of the same
weights exported by cnnrnn.export and run by onnxruntime on CPU (onnx_infer_img_per_s). With --device cuda the
models run on the GPU (bf16 autocast unless --no-amp, as training there) and the peak is the GPU's matmul. Models
are built from their task's default config.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnrnn import build
from cnnrnn.config import MAX_BATCH, preset
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.items import Format, Split
from cnnrnn.data.loader import ItemSource
from cnnrnn.engine import autocast, keep_freed_memory, resolve_amp, to_device
from cnnrnn.errors import UserError, fail, refusals
from cnnrnn.files import check_writable, write_atomic
from cnnrnn.ranks import pick_device
from cnnrnn.tasks import make_task

FORMAT = Format(tuple(str(c) for c in range(10)))  # ten classes of 28x28 gray items: random pixels time the same
MODELS = {"lstm": ("lstm", {}), "lstm2": ("lstm2", {}), "cnn": ("cnn", {}), "cnn_rnn": ("multilabel", {}),
          "cnn_bce": ("multilabel_bce", {}),
          "cnn_rnn_picture": ("multilabel", {"model": {"encoder": "picture"}})}  # the reader slid over 56x56 pictures


def seconds(fn, min_time: float) -> float:
    """Median seconds per call of fn() (torch.utils.benchmark: warm-up, this process's threads, CUDA synced)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its import warns of a CUDA-less CUDA build
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_time).median


def matmul_peak(device: torch.device, dtype=torch.float32, n: int = 2048) -> float:
    """GFLOP/s of a large square matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n ** 3 / seconds(lambda: a @ b, 0.5) / 1e9


def fake_source(composites: bool, n: int = 4096):
    """Random items in memory, shaped as the real data (the speed does not depend on the pixels)."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                  torch.randint(0, len(FORMAT.classes), (n,), generator=g))
    return CompositeSource(split, n, grid=2, min_items=1, max_items=4, seed=0) if composites else ItemSource(split)


def onnx_infer_rate(cfg, model, task, images: torch.Tensor, min_time: float) -> float:
    """Images/s of onnxruntime on the exported model (same weights, same batch, as many threads as torch)."""
    from cnnrnn import export
    from cnnrnn.inference import OnnxModel

    with tempfile.TemporaryDirectory() as tmp:
        path = export.export(model, task, Path(tmp) / "model.onnx", task.side(cfg), export.metadata(cfg, task))
        onnx_model = OnnxModel(path, threads=torch.get_num_threads())
    return len(images) / seconds(lambda: onnx_model.run(images), min_time)


def onnx_missing() -> str | None:
    """Why --onnx cannot run here (onnx or onnxruntime not installed), or None."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed (pip install 'cnnrnn[export]')" if missing else None


def bench_model(name: str, batch_size: int, min_time: float, peak: float, amp: bool | None, onnx: bool,
                device: torch.device) -> dict:
    """One model's record; amp None means the setting training uses (engine.resolve_amp of the task's)."""
    task_name, changes = MODELS[name]
    cfg = preset(task_name, trainer={"batch_size": batch_size}, **changes)
    amp = resolve_amp(cfg.trainer.amp, device) if amp is None else amp
    task = make_task(cfg, FORMAT)
    model = build.model(cfg, FORMAT).to(device, memory_format=torch.channels_last)  # as in training
    optimizer, scheduler = build.optimizer(cfg, model, steps_per_epoch=1000)
    source = fake_source(task.composite, max(4096, 2 * batch_size))  # a whole batch, and more for the data path
    order = source.order(0)
    batch = to_device(source.batch(order[:batch_size]), device)

    def step():
        with autocast(device, amp):
            loss, _ = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    model.train()
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # from mkldnn.flags
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as fc:
        step()  # counted with oneDNN off, so that the LSTM is seen as matmuls
    flops = fc.get_total_flops() / batch_size
    sec = seconds(step, min_time)
    starts = iter(range(0, 10 ** 9, batch_size))
    data_sec = seconds(lambda: source.batch(order[next(starts) % (len(order) - batch_size):][:batch_size]), min_time)
    model.eval()
    with torch.inference_mode():
        infer = seconds(lambda: task.predict(model, batch), min_time / 2)
    gflops = flops * batch_size / sec / 1e9
    record = {"model": name, "batch_size": batch_size, "ms_per_step": round(sec * 1000, 2),
              "samples_per_s": round(batch_size / sec, 1), "mflops_per_sample": round(flops / 1e6, 2),
              "gflops": round(gflops, 1), "mfu": round(gflops / peak, 3),
              "infer_images_per_s": round(batch_size / infer, 1),
              "data_share": round(data_sec / (data_sec + sec), 4), "amp": amp}
    if onnx:
        record["onnx_infer_img_per_s"] = round(onnx_infer_rate(cfg, model, task, batch["image"], min_time / 2), 1)
    return record


def bench_composites(batch_size: int = 512) -> float:
    """Composite images generated per second (layout sampling and rendering, as in a training epoch)."""
    src = fake_source(True, 55000)
    layout = src.order(0)
    starts = iter(range(0, 10 ** 9, batch_size))
    sec = seconds(lambda: src.batch(layout[next(starts) % 50000:][:batch_size]), 1.0)
    layout_sec = seconds(lambda: src.order(1), 1.0) / len(src)
    return batch_size / (sec + layout_sec * batch_size)


def check(args) -> tuple[list[str], list[int]]:
    """The models and batch sizes asked for; a sentence for any bad argument."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise UserError(f"--models: unknown model {(unknown or [args.models])[0]!r}; choose from {', '.join(MODELS)}.")
    try:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes {args.batch_sizes} must be comma-separated integers, e.g. 32,128.") from None
    if any(not 1 <= b <= MAX_BATCH for b in sizes):
        raise UserError(f"--batch-sizes {args.batch_sizes}: each must be between 1 and {MAX_BATCH:,}, e.g. 32,128.")
    if not 0 < args.seconds <= 600:
        raise UserError(f"--seconds {args.seconds:g} must be more than 0 and at most 600.")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads} must be at least 1.")
    if args.onnx and args.device == "cuda":
        raise UserError("--onnx times onnxruntime on the CPU, beside the CPU model; run it with --device cpu.")
    pick_device(args.device, "--device ")
    if args.json:
        check_writable(args.json, f"--json {args.json}", "bench.json")
    return models, sizes


def machine(device: torch.device) -> dict:
    return {"peak_gflops_fp32": round(matmul_peak(device), 1),
            "peak_gflops_bf16": round(matmul_peak(device, torch.bfloat16), 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--seconds", type=float, default=2.0, help="least time spent timing each step (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast on or off (default: as each task trains)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run")
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--onnx", action="store_true", help="also time inference of the exported model in "
                                                           "onnxruntime (needs the [export] extras)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with refusals():
        models, sizes = check(args)  # all before the minutes of timing
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = torch.device(args.device)
    missing = onnx_missing() if args.onnx else None
    if missing:
        print(f"--onnx: skipped, {missing}", file=sys.stderr)
    onnx = args.onnx and not missing
    records = []
    try:
        info = machine(device)
        print(f"fp32 matmul peak {info['peak_gflops_fp32']} GFLOP/s, bf16 {info['peak_gflops_bf16']} GFLOP/s, "
              f"{info['threads']} threads, torch {info['torch']}", file=sys.stderr)
        print(f"{'model':<15} {'batch':>5} {'ms/step':>8} {'samples/s':>10} {'MFLOP/smp':>10} {'GFLOP/s':>8} "
              f"{'MFU':>6} {'infer img/s':>11} {'data':>6}" + (f" {'onnx img/s':>10}" if onnx else ""))
        for name in models:
            for b in sizes:
                r = bench_model(name, b, args.seconds, info["peak_gflops_fp32"], args.amp, onnx, device)
                records.append({**r, **info})
                print(f"{name:<15} {b:>5} {r['ms_per_step']:>8.2f} {r['samples_per_s']:>10.0f} "
                      f"{r['mflops_per_sample']:>10.2f} {r['gflops']:>8.1f} {r['mfu']:>6.1%} "
                      f"{r['infer_images_per_s']:>11.0f} {r['data_share']:>6.1%}"
                      + (f" {r['onnx_infer_img_per_s']:>10.0f}" if onnx else ""), flush=True)
        rate = bench_composites()
    except KeyboardInterrupt:
        fail("Interrupted; the rows above are what was timed" + (f", and {args.json} was not written."
                                                                 if args.json else "."), 130)
    print(f"composite generation: {rate:,.0f} images/s")
    records.append({"model": "composites", "images_per_s": round(rate), **info})
    if args.json:
        with refusals():  # checked up front; the disk can still fill or the folder go
            write_atomic(args.json, json.dumps(records, indent=2), then="the table above holds the same numbers")


if __name__ == "__main__":
    main()
