"""Loaders for the real models and test sets in ../shared/data, with the standard splits.

    python tools/shared_data.py OUT_DIR      # writes {mnist,cifar10}_{calib,eval}.npz

cifar10-vit: calibration = the first 100 files (sorted names) of every class (1,000 images),
evaluation = the other 9,000. mnist-vit: calibration = test images 0..999, evaluation =
1000..9999. Preprocessing as in each folder's README.
"""

from __future__ import annotations

import gzip
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR_DIR = SHARED / "cifar10-vit"
MNIST_DIR = SHARED / "mnist-vit"
CIFAR_MODEL = CIFAR_DIR / "vit_cifar10_fp32.onnx"
MNIST_MODEL = MNIST_DIR / "vit_mnist_fp32.onnx"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010])


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(10000, 1, 28, 28) float32 normalised, (10000,) int64."""
    x = np.frombuffer(gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    y = np.frombuffer(gzip.open(MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8).astype(np.int64)
    return ((x / 255.0 - 0.1307) / 0.3081).astype(np.float32), y


def load_cifar10() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(10000, 3, 32, 32) float32 normalised, labels, and a calibration mask (first 100 per class)."""
    from PIL import Image

    z = zipfile.ZipFile(CIFAR_DIR / "cifar10_test_jpg.zip")
    names = sorted(n for n in z.namelist() if n.endswith(".jpg"))
    xs, ys = [], []
    for n in names:
        xs.append(np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")))
        ys.append(CLASSES.index(n.split("/")[-2]))
    x = np.stack(xs)
    y = np.array(ys, dtype=np.int64)
    x = ((x / 255.0 - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2).astype(np.float32)
    calib = np.zeros(len(y), dtype=bool)
    for c in range(10):
        calib[np.flatnonzero(y == c)[:100]] = True
    return x, y, calib


def splits(name: str) -> tuple[dict, dict]:
    """{'input': x, 'labels': y} for calibration and evaluation."""
    if name == "mnist":
        x, y = load_mnist()
        return {"input": x[:1000], "labels": y[:1000]}, {"input": x[1000:], "labels": y[1000:]}
    if name == "cifar10":
        x, y, m = load_cifar10()
        return {"input": x[m], "labels": y[m]}, {"input": x[~m], "labels": y[~m]}
    raise ValueError(name)


def write_npz(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("mnist", "cifar10"):
        calib, ev = splits(name)
        np.savez(out_dir / f"{name}_calib.npz", **calib)
        np.savez(out_dir / f"{name}_eval.npz", **ev)


if __name__ == "__main__":
    write_npz(Path(sys.argv[1] if len(sys.argv) > 1 else "bench_data"))
