"""Speed table: python -m cnnrnn.bench [--models lstm,cnn] [--batch-sizes 32,128] [--json PATH] [--onnx] [--device D].

Per model and batch size: training ms/step (forward + backward + optimizer step, steady state after
warm-up, median of repeats), samples/s, counted FLOPs per sample, achieved GFLOP/s and MFU (against a large
fp32 matmul timed in the same process), inference images/s; plus composite generation images/s and the
data path's share of a training step. With --onnx, also the inference images/s of the same weights exported
by cnnrnn.export and run by onnxruntime on CPU (onnx_infer_img_per_s). With --device cuda the models run on the
GPU (bf16 autocast unless --no-amp, as training there) and the peak is the GPU's matmul. Models are built from
their task's default config.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnrnn import build
from cnnrnn.config import preset
from cnnrnn.data.composite import CompositeSource
from cnnrnn.data.fashion_mnist import Split
from cnnrnn.data.loader import ItemSource
from cnnrnn.engine import autocast, keep_freed_memory, resolve_amp, to_device
from cnnrnn.errors import UserError, fail
from cnnrnn.files import check_writable, write_atomic
from cnnrnn.ranks import pick_device
from cnnrnn.tasks import make_task

MAX_BATCH = 65536  # beyond, a step's activations outgrow any machine's memory
MODELS = {"lstm": "lstm", "lstm2": "lstm2", "cnn": "cnn", "cnn_rnn": "multilabel", "cnn_bce": "multilabel_bce"}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype=torch.float32, n: int = 2048, repeats: int = 5, device=torch.device("cpu")) -> float:
    """GFLOP/s of a large square matmul: the machine's practical peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times) / 1e9


def fake_source(composites: bool, n: int = 4096):
    """Random items in memory, shaped as the real data (the speed does not depend on the pixels)."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (n,), generator=g))
    return CompositeSource(split, size=n, seed=0) if composites else ItemSource(split)


def time_it(fn, steps: int, repeats: int, device=torch.device("cpu")) -> float:
    """Median seconds per call over `repeats` runs of `steps` calls."""
    runs = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        runs.append((time.perf_counter() - t) / steps)
    return statistics.median(runs)


def onnx_infer_rate(cfg, model, batch: dict, steps: int, repeats: int) -> float:
    """Images/s of onnxruntime on the exported model (same weights, same batch, as many threads as torch)."""
    from cnnrnn import export
    from cnnrnn.inference import OnnxModel

    task = make_task(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = export.export(model, task, Path(tmp) / "model.onnx", task.side(cfg), export.metadata(cfg, task))
        onnx_model = OnnxModel(path, threads=torch.get_num_threads())
    images = batch["image"]
    onnx_model.run(images)
    return len(images) / time_it(lambda: onnx_model.run(images), max(2, steps // 2), repeats)


def onnx_missing() -> str | None:
    """Why --onnx cannot run here (onnx or onnxruntime not installed), or None."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed (pip install 'cnnrnn[export]')" if missing else None


def bench_model(name: str, batch_size: int, steps: int, repeats: int, peak: float, amp: bool | None,
                compile_model: bool, onnx: bool = False, device=torch.device("cpu")) -> dict:
    """One model's record; amp None means the setting training uses (engine.resolve_amp of the task's)."""
    cfg = preset(MODELS[name], trainer={"batch_size": batch_size})
    amp = resolve_amp(cfg.trainer.amp, device) if amp is None else amp
    task = make_task(cfg)
    model = build.model(cfg).to(device, memory_format=torch.channels_last)  # as in training
    optimizer, scheduler = build.optimizer(cfg, model, steps_per_epoch=1000)
    train_model = torch.compile(model) if compile_model else model
    source = fake_source(task.any_grid, max(4096, 2 * batch_size))  # a whole batch, and more for the data path
    order = source.order(0)
    batch = to_device(source.batch(order[:batch_size]), device)

    def step():
        with autocast(device, amp):
            loss, _ = task.loss(train_model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    model.train()
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")  # from mkldnn.flags
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as fc:
        step()  # counted with oneDNN off, so that the LSTM is seen as matmuls
    flops = fc.get_total_flops() / batch_size
    for _ in range(3):
        step()
    sec = time_it(step, steps, repeats, device)
    i = iter(range(10 ** 9))
    data_sec = time_it(lambda: source.batch(order[(next(i) * batch_size) % (len(order) - batch_size):][:batch_size]),
                       steps, repeats)
    model.eval()
    with torch.inference_mode():
        task.predict(model, batch)
        infer = time_it(lambda: task.predict(model, batch), max(2, steps // 2), repeats, device)
    gflops = flops * batch_size / sec / 1e9
    record = {"model": name, "batch_size": batch_size, "ms_per_step": round(sec * 1000, 2),
              "samples_per_s": round(batch_size / sec, 1), "mflops_per_sample": round(flops / 1e6, 2),
              "gflops": round(gflops, 1), "mfu": round(gflops / peak, 3),
              "infer_images_per_s": round(batch_size / infer, 1),
              "data_share": round(data_sec / (data_sec + sec), 4), "amp": amp, "compile": compile_model}
    if onnx:
        record["onnx_infer_img_per_s"] = round(onnx_infer_rate(cfg, model, batch, steps, repeats), 1)
    return record


def bench_composites(batch_size: int = 512, steps: int = 50) -> float:
    """Composite images generated per second (layout sampling and rendering, as in a training epoch)."""
    src = CompositeSource(fake_source(False, 55000).split, size=55000, seed=0)
    layout = src.order(0)
    i = iter(range(10 ** 9))
    sec = time_it(lambda: src.batch(layout[(next(i) * batch_size) % 50000:][:batch_size]), steps, 3)
    t = time.perf_counter()
    src.order(1)
    layout_sec = (time.perf_counter() - t) / len(src)
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
    for flag, value in (("--steps", args.steps), ("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1.")
    if args.onnx and args.device == "cuda":
        raise UserError("--onnx times onnxruntime on the CPU, beside the CPU model; run it with --device cpu.")
    pick_device(args.device, "--device ")
    if args.json:
        check_writable(args.json, f"--json {args.json}", "bench.json")
    return models, sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cnnrnn.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--batch-sizes", default="32,128")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast on or off (default: as each task trains)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models run")
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--onnx", action="store_true", help="also time inference of the exported model in "
                                                           "onnxruntime (needs the [export] extras)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        models, sizes = check(args)  # all before the minutes of timing
    except UserError as exc:
        fail(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    device = torch.device(args.device)
    peak = matmul_peak(device=device)
    machine = {"peak_gflops_fp32": round(peak, 1),
               "peak_gflops_bf16": round(matmul_peak(torch.bfloat16, device=device), 1),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor(),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(f"fp32 matmul peak {machine['peak_gflops_fp32']} GFLOP/s, bf16 {machine['peak_gflops_bf16']} GFLOP/s, "
          f"{machine['threads']} threads, torch {machine['torch']}", file=sys.stderr)
    onnx = args.onnx
    missing = onnx_missing() if onnx else None
    if missing:
        print(f"--onnx: skipped, {missing}", file=sys.stderr)
        onnx = False
    header = f"{'model':<8} {'batch':>5} {'ms/step':>8} {'samples/s':>10} {'MFLOP/smp':>10} {'GFLOP/s':>8} " \
             f"{'MFU':>6} {'infer img/s':>11} {'data':>6}" + (f" {'onnx img/s':>10}" if onnx else "")
    print(header)
    records = []
    try:
        for name in models:
            for b in sizes:
                r = bench_model(name, b, args.steps, args.repeats, peak, args.amp, args.compile, onnx, device)
                records.append({**r, **machine})
                print(f"{name:<8} {b:>5} {r['ms_per_step']:>8.2f} {r['samples_per_s']:>10.0f} "
                      f"{r['mflops_per_sample']:>10.2f} {r['gflops']:>8.1f} {r['mfu']:>6.1%} "
                      f"{r['infer_images_per_s']:>11.0f} {r['data_share']:>6.1%}"
                      + (f" {r['onnx_infer_img_per_s']:>10.0f}" if onnx else ""), flush=True)
        rate = bench_composites()
    except KeyboardInterrupt:
        fail("Interrupted; the rows above are what was timed" + (f", and {args.json} was not written."
                                                                 if args.json else "."), 130)
    print(f"composite generation: {rate:,.0f} images/s")
    records.append({"model": "composites", "images_per_s": round(rate), **machine})
    if args.json:
        try:
            write_atomic(args.json, json.dumps(records, indent=2), then="the table above holds the same numbers")
        except UserError as exc:  # checked up front; the disk can still fill or the folder go
            fail(str(exc))


if __name__ == "__main__":
    main()
