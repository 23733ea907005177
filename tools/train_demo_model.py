#!/usr/bin/env python
"""Train the demo model of ``onnx-mptq demo``: a tiny pre-norm GELU ViT on scikit-learn's digits.

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 grey images, 16 grey levels, BSD-3-Clause, bundled
with scikit-learn, no download). Deterministic stratified split (``random_state=seed``): 400
evaluation images, then 200 calibration and 1,197 training images from the rest. Pixels are
divided by 16 (-> [0, 1]) and normalised with the training split's pixel mean and std
(``x = (v / 16 - MEAN) / STD``, both printed and written to models/README.md).

Model: timm ``VisionTransformer`` (``vit_tiny_patch16_224`` with ``img_size=8, patch_size=2,
in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2, num_classes=10``): 16 patch tokens +
a class token, pre-norm blocks, GELU MLP, LayerNorm eps 1e-6.

Training: AdamW (lr 3e-3, weight decay 0.05), linear warm-up then cosine decay, label smoothing
0.1, batch 64, random shifts of up to 1 pixel (zero fill) as augmentation, CPU, one thread, every
generator seeded, so a rerun gives the same weights and numbers.

Outputs (``--out-dir``, default ``models/`` of the repository):
  digits_vit.onnx   opset 17, input ``input`` [N, 1, 8, 8] float32 (normalised), output ``logits`` [N, 10]
  digits_calib.npz  ``input`` (200, 1, 8, 8) float32 normalised, ``labels`` (200,) int64
  digits_eval.npz   ``input`` (400, 1, 8, 8) float32 normalised, ``labels`` (400,) int64
  README.md         what the files are, the licence, the command and the measured accuracy

Usage: python tools/train_demo_model.py [--out-dir models] [--epochs 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import timm  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from onnx_mptq.calibrate.session import make_session  # noqa: E402
from onnx_mptq.config import Providers, RuntimeConfig  # noqa: E402
from onnx_mptq.export import export_model  # noqa: E402
from onnx_mptq.graph.io import write_text_atomic  # noqa: E402

N_EVAL = 400
N_CALIB = 200
MODEL_KWARGS = dict(
    img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10
)


def split_digits(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Raw pixels in [0, 1] as (n, 1, 8, 8) float32 and labels int64 for train / calib / eval."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, ev = train_test_split(idx, test_size=N_EVAL, stratify=y, random_state=seed)
    train, calib = train_test_split(rest, test_size=N_CALIB, stratify=y[rest], random_state=seed)
    return {name: (x[np.sort(i)], y[np.sort(i)]) for name, i in (("train", train), ("calib", calib), ("eval", ev))}


def shift_batch(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by (dy, dx) in {-1, 0, 1}^2 with zero fill (x is raw [0, 1] pixels)."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))  # (n, 1, 10, 10)
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])  # (n, 8)
    cols = (dx[:, None] + torch.arange(8)[None, :])  # (n, 8)
    b = torch.arange(n)[:, None, None]
    return padded[b, 0, rows[:, :, None], cols[:, None, :]][:, None]  # (n, 1, 8, 8)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    data = split_digits(args.seed)
    x_train_raw, y_train = data["train"]
    mean = round(float(x_train_raw.mean()), 4)
    std = round(float(x_train_raw.std()), 4)
    norm = lambda v: ((v - mean) / std).astype(np.float32)  # noqa: E731

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODEL_KWARGS)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(y_train) / args.batch)
    total = args.epochs * steps_per_epoch
    warm = 5 * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    xt = torch.from_numpy(x_train_raw)
    yt = torch.from_numpy(y_train)
    x_eval = norm(data["eval"][0])
    y_eval = data["eval"][1]

    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(perm), args.batch):
            b = perm[i : i + args.batch]
            xb = (shift_batch(xt[b], gen) - mean) / std
            loss = loss_fn(model(xb), yt[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            model.eval()
            with torch.no_grad():
                acc = accuracy(model(torch.from_numpy(x_eval)).numpy(), y_eval)
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  eval acc {acc:.4f}  ({time.time() - t0:.0f} s)")
    train_time = time.time() - t0

    model.eval()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = RuntimeConfig(providers=Providers.CPU, threads=1)
    result = export_model(model, out_dir / "digits_vit.onnx", name="digits_vit", input_shape=(1, 8, 8), opset=17, runtime=runtime)
    with torch.no_grad():
        torch_acc = accuracy(model(torch.from_numpy(x_eval)).numpy(), y_eval)
    session = make_session(result.path, runtime)
    onnx_logits = np.concatenate([session.run({"input": x_eval[i : i + 100]})[0] for i in range(0, len(y_eval), 100)])
    onnx_acc = accuracy(onnx_logits, y_eval)
    x_calib, y_calib = data["calib"]
    calib_acc = accuracy(session.run({"input": norm(x_calib)})[0], y_calib)

    save_npz_atomic(out_dir / "digits_calib.npz", input=norm(x_calib), labels=y_calib)
    save_npz_atomic(out_dir / "digits_eval.npz", input=x_eval, labels=y_eval)
    sizes = {p.name: p.stat().st_size for p in sorted(out_dir.glob("digits_*"))}
    print(f"normalisation: mean {mean}, std {std}")
    print(f"parameters: {n_params}; training time {train_time:.0f} s")
    print(f"FP32 accuracy on digits_eval (400): torch {torch_acc:.4f}, ONNX Runtime {onnx_acc:.4f}; calib split {calib_acc:.4f}")
    print(f"max |ORT - torch| on random inputs: {result.max_abs_diff:.2e}")
    print("files: " + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items()))
    write_text_atomic(out_dir / "README.md", readme(args, mean, std, n_params, onnx_acc, calib_acc, sizes))


def readme(args: argparse.Namespace, mean: float, std: float, n_params: int, acc: float, calib_acc: float, sizes: dict[str, int]) -> str:
    cmd = "python tools/train_demo_model.py" + (
        "" if (args.epochs, args.seed, args.lr, args.batch) == (200, 0, 3e-3, 64) else f" --epochs {args.epochs} --seed {args.seed} --lr {args.lr} --batch {args.batch}"
    )
    files = "\n".join(f"| `{k}` | {v / 1024:.0f} KiB |" for k, v in sizes.items())
    return f"""# Demo model: a tiny ViT on scikit-learn's 8x8 digits

The default model of `onnx-mptq demo` and a small real (trained) ViT for tests. Everything here is
produced by `tools/train_demo_model.py`; nothing is downloaded.

| file | size |
|---|---|
{files}

- `digits_vit.onnx`: timm `VisionTransformer` ({n_params:,} parameters): 8x8 grey images, patch 2
  (16 tokens + class token), width 64, depth 4, 4 heads, MLP ratio 2, pre-norm LayerNorm, GELU,
  10 classes. ONNX opset 17 (`LayerNormalization` op), input `input` float32 `[N, 1, 8, 8]`
  (dynamic batch `N`), output `logits` `[N, 10]`.
- `digits_calib.npz` (200 images) and `digits_eval.npz` (400 images): arrays `input` (float32,
  NCHW, already normalised) and `labels` (int64). The two splits and the 1,197 training images are
  disjoint and stratified by class.

Preprocessing (already applied to the stored inputs): `x = (pixel / 16 - {mean}) / {std}` where
pixel is scikit-learn's 0..16 grey level; mean and std are those of the training split.

**Measured FP32 top-1 accuracy** (ONNX Runtime, CPU): **{acc * 100:.2f} %** on `digits_eval.npz`
(400 images); {calib_acc * 100:.2f} % on the calibration split.

## Licence

The data are scikit-learn's bundled copy of the test set of the UCI "Optical Recognition of
Handwritten Digits" dataset (E. Alpaydin, C. Kaynak), `sklearn.datasets.load_digits`, distributed
with scikit-learn under the BSD-3-Clause licence (the UCI repository itself lists the original
dataset under CC BY 4.0). The model weights were trained for this project from that data and are
released with the project.

## How it was made

```
{cmd}
```

CPU only, one thread, every random generator seeded (`--seed {args.seed}`): the split, the
initialisation, the batch order and the augmentation (random shifts of up to one pixel) repeat
exactly, so a rerun reproduces the numbers above. AdamW (lr {args.lr}, weight decay 0.05), 5 warm-up
epochs then cosine decay over {args.epochs} epochs, batch {args.batch}, label smoothing 0.1.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(REPO / "models"))
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    train(args)


if __name__ == "__main__":
    main()
