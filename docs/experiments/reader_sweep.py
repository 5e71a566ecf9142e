"""The per-item reader's recipe search (docs/recipes.md): python docs/experiments/reader_sweep.py ROUND OUT.jsonl [WORKERS]

Trains each recipe of ROUND (1 or 2) on the 55,000 training items of the project's split, scores the validation
items every epoch (the exponential moving average of the weights, plain and with test-time flips), and the test
items once with the weights of the best validation epoch; one JSON line per recipe. Run on one GPU with WORKERS
processes side by side (8 in round 1, 6 in round 2); the CPU budget of each recipe (its epochs) comes from the
step times measured on 2 CPU cores. Uses the project's data, augmentation and SmallCNN; the residual readers
with global average pooling tried here are defined below (they lost, so they are not in the package).
"""
import copy, json, math, os, sys, time, traceback
import multiprocessing as mp

T0 = time.time()
START_BY, KILL_AT = 1e9, 1e9


def run_job(job, dev):
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, os.getcwd())
    from cnnrnn.data import fashion_mnist
    from cnnrnn.data.augment import Augment
    from cnnrnn.models.cnn import SmallCNN
    MEAN, STD = 0.2860, 0.3530
    torch.manual_seed(job["seed"])
    data = fashion_mnist.splits("data/", 5000)
    tr, va, te = (data[k].to(dev) for k in ("train", "val", "test"))
    if job.get("oldcnn"):  # the package's SmallCNN, as task=reader builds it
        model = SmallCNN(channels=(32, 64), convs=2, hidden=256, dropout=0.3)
    else:
        model = resnet_reader(job["widths"], job["blocks"], job.get("dropout", 0.0), job.get("hidden", 0))
    model = model.to(dev, memory_format=torch.channels_last)
    ema = copy.deepcopy(model)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": job["wd"]}, {"params": rest, "weight_decay": 0.0}]
    if job["opt"] == "adamw":
        opt = torch.optim.AdamW(groups, lr=job["lr"], fused=True)
    else:
        opt = torch.optim.SGD(groups, lr=job["lr"], momentum=0.9, nesterov=True, fused=True)
    bs, epochs = job["bs"], job["epochs"]
    steps = len(tr) // bs
    total, warm = epochs * steps, int(job.get("warmup", 1.0) * steps)
    def factor(s):
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    flip_shift = Augment(hflip=0.5, shift=job["shift"])

    def aug(images, seed):  # random erasing (lost here, so no longer in the package) after flips and shifts
        g = torch.Generator().manual_seed(seed + 1)
        images = flip_shift(images, seed)
        n = len(images)
        on = (torch.rand(n, generator=g) < job["erase"]).to(images.device)
        h, w = torch.randint(4, 13, (2, n), generator=g).to(images.device)
        y0 = (torch.rand(n, generator=g).to(images.device) * (29 - h)).long()
        x0 = (torch.rand(n, generator=g).to(images.device) * (29 - w)).long()
        r = torch.arange(28, device=images.device)
        box = (((r >= y0[:, None]) & (r < (y0 + h)[:, None]))[:, :, None]
               & ((r >= x0[:, None]) & (r < (x0 + w)[:, None]))[:, None, :])
        return images.masked_fill(box & on[:, None, None], 0)
    norm = lambda im: ((im.float() / 255 - MEAN) / STD).unsqueeze(1).contiguous(memory_format=torch.channels_last)
    ema_params = [t for t in (*ema.parameters(), *ema.buffers())]
    cur_params = [t for t in (*model.parameters(), *model.buffers())]
    fl = [(a, c) for a, c in zip(ema_params, cur_params) if a.is_floating_point()]
    ints = [(a, c) for a, c in zip(ema_params, cur_params) if not a.is_floating_point()]
    n_avg = 0

    @torch.no_grad()
    def accuracy(net, split, tta):
        net.eval()
        right = 0
        for i in range(0, len(split), 1000):
            x = norm(split.images[i:i + 1000])
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                p = net(x).float().softmax(1)
                if tta:
                    p = p + net(x.flip(-1)).float().softmax(1)
            right += (p.argmax(1) == split.labels[i:i + 1000]).sum().item()
        return right / len(split)

    curve, best, best_state, t_train = [], (-1, 0), None, 0.0
    for epoch in range(epochs):
        model.train()
        t = time.time()
        order = torch.randperm(len(tr), generator=torch.Generator().manual_seed(job["seed"] * 1000 + epoch)).to(dev)
        for s in range(steps):
            idx = order[s * bs:(s + 1) * bs]
            x = norm(aug(tr.images[idx], (epoch * 100003 + s) % 2**31) if job["aug"] else tr.images[idx])
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), tr.labels[idx], label_smoothing=job["ls"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                if job["ema"]:
                    if n_avg == 0:
                        torch._foreach_copy_([a for a, _ in fl], [c for _, c in fl])
                    else:
                        d = min(job["ema"], (1 + n_avg) / (10 + n_avg))
                        torch._foreach_lerp_([a for a, _ in fl], [c for _, c in fl], 1 - d)
                    for a, c in ints:
                        a.copy_(c)
                    n_avg += 1
        (torch.cuda.synchronize() if dev.type == "cuda" else None)
        t_train += time.time() - t
        net = ema if job["ema"] else model
        v, vt = accuracy(net, va, False), accuracy(net, va, True)
        curve.append((round(v, 4), round(vt, 4)))
        if v > best[0]:
            best, best_state = (v, epoch + 1), copy.deepcopy(net.state_dict())
    final = net
    net = copy.deepcopy(final)
    net.load_state_dict(best_state)
    return {**job, "val_best": best[0], "best_epoch": best[1], "val_last": curve[-1][0], "val_tta_best": max(c[1] for c in curve),
            "test_at_best": accuracy(net, te, False), "test_tta_at_best": accuracy(net, te, True),
            "train_s_per_epoch": round(t_train / epochs, 2), "curve": curve}


def resnet_reader(widths, blocks, dropout=0.0, hidden=0, num_classes=10):
    """A stem conv, then per stage a 2x2 max pool (but the first), a conv to the stage's width and `blocks`
    residual blocks; global average pooling (or a dense layer of `hidden` over the map) and a linear head."""
    import torch
    from torch import nn

    def conv_bn(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]

    class Block(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.body = nn.Sequential(*conv_bn(w, w), nn.ReLU(inplace=True), *conv_bn(w, w))

        def forward(self, x):
            return torch.relu(x + self.body(x))

    layers, c_in = [], 1
    for i, (w, n) in enumerate(zip(widths, blocks)):
        layers += ([nn.MaxPool2d(2)] if i else []) + conv_bn(c_in, w) + [nn.ReLU(inplace=True)]
        layers += [Block(w) for _ in range(n)]
        c_in = w
    side = 28 >> (len(widths) - 1)
    pool = ([nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * side * side, hidden), nn.ReLU(inplace=True),
             nn.Dropout(dropout)] if hidden else [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)])
    return nn.Sequential(*layers, *pool, nn.Linear(hidden or c_in, num_classes))


def rounds():
    """The recipes of the two rounds (CPU epochs: what 15 minutes of two cores allow each width)."""
    base1 = dict(opt="adamw", lr=2e-3, wd=0.05, ls=0.1, ema=0.999, bs=256, shift=2, erase=0.5, aug=True, seed=0,
                 warmup=1.0)
    archs = {"A": ((32, 64, 128), (0, 1, 1), 18), "B": ((24, 48, 96), (0, 1, 1), 24),
             "C": ((16, 32, 64, 128), (0, 1, 1, 1), 38), "D": ((32, 64, 128), (0, 0, 1), 28),
             "E": ((16, 32, 64), (1, 1, 1), 32), "F": ((32, 64, 128), (0, 1, 2), 14), "G": ((32, 64, 128), (0, 0, 0), 50)}
    one, two = [], []

    def add(jobs, base, name, arch, **kw):
        w, b, e = archs[arch] if arch in archs else arch
        jobs.append({**base, "name": name, "widths": w, "blocks": b, "epochs": e, **kw})

    add(one, base1, "L1 w64-128-256 b111 e40", ((64, 128, 256), (1, 1, 1), 40))
    add(one, base1, "L2 w48-96-192 b022 e40", ((48, 96, 192), (0, 2, 2), 40))
    for a in archs:
        add(one, base1, f"{a} base", a)
    for a in "ABC":
        add(one, base1, f"{a} noaug-shift-erase", a, shift=0, erase=0.0)
        add(one, base1, f"{a} shift2 only", a, erase=0.0)
        add(one, base1, f"{a} erase only", a, shift=0)
    for a in "AC":
        add(one, base1, f"{a} lr1e-3", a, lr=1e-3)
        add(one, base1, f"{a} lr4e-3", a, lr=4e-3)
        add(one, base1, f"{a} sgd0.1", a, opt="sgd", lr=0.1, wd=5e-4)
    base2 = {**base1, "erase": 0.0}
    A, C, E = ((32, 64, 128), (0, 1, 1), 0), ((16, 32, 64, 128), (0, 1, 1, 1), 0), ((16, 32, 64), (1, 1, 1), 0)
    for name, arch, epochs, kw in [
            ("L1 e60 lr4e-3 erase0.5", ((64, 128, 256), (1, 1, 1), 60), None, dict(lr=4e-3, erase=0.5)),
            ("oldcnn e32 bs128 lr1e-3 flips", A, 32, dict(oldcnn=True, bs=128, lr=1e-3, shift=0, dropout=0.3)),
            ("oldcnn e32 bs128 lr2e-3 shift2", A, 32, dict(oldcnn=True, bs=128)),
            ("C-dense256 e45 lr2e-3", C, 45, dict(hidden=256, dropout=0.3)),
            ("A lr4e-3 shift2", A, 18, dict(lr=4e-3)), ("C lr4e-3 shift2", C, 36, dict(lr=4e-3)),
            ("oldcnn e32 bs256 lr4e-3 shift2", A, 32, dict(oldcnn=True, lr=4e-3)),
            ("C-dense256 e45 lr4e-3", C, 45, dict(hidden=256, dropout=0.3, lr=4e-3)),
            ("A lr8e-3 shift2", A, 18, dict(lr=8e-3)),
            ("b010-dense256 e24", ((32, 64, 128), (0, 1, 0), 0), 24, dict(hidden=256, dropout=0.3)),
            ("A bs128 shift2", A, 18, dict(bs=128)), ("E lr4e-3 shift2", E, 30, dict(lr=4e-3)),
            ("C-dense256 e45 erase0.5", C, 45, dict(hidden=256, dropout=0.3, erase=0.5))]:
        add(two, base2, name, (arch[0], arch[1], epochs or arch[2]), **kw)
    return {"1": one, "2": two}


def worker(wid, queue, lock, out):
    import torch
    dev = torch.device(os.environ.get("DEV", "cuda"))
    torch.backends.cudnn.benchmark = True
    while time.time() - T0 < START_BY:
        try:
            job = queue.get_nowait()
        except Exception:
            return
        t = time.time()
        try:
            res = run_job(job, dev)
        except Exception:
            res = {**job, "error": traceback.format_exc()[-800:]}
        res["wall_s"] = round(time.time() - t, 1)
        with lock:
            with open(out, "a") as f:
                f.write(json.dumps(res) + "\n")
        print(f"[{time.time() - T0:6.0f}s] w{wid} {job['name']}: {res.get('val_best')} tta {res.get('val_tta_best')} "
              f"({res['wall_s']} s, {res.get('train_s_per_epoch')} s/ep)", flush=True)


if __name__ == "__main__":
    mp.set_start_method("spawn")
    jobs, out = rounds()[sys.argv[1]], sys.argv[2]
    q, lock = mp.Queue(), mp.Lock()
    for j in jobs:
        q.put(j)
    ps = [mp.Process(target=worker, args=(i, q, lock, out)) for i in range(int(sys.argv[3]) if len(sys.argv) > 3 else 4)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(timeout=max(1, KILL_AT - (time.time() - T0)))
    for p in ps:
        if p.is_alive():
            p.terminate()
    print("done", time.time() - T0, flush=True)
