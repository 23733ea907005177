"""Data sources: npz, image folders, readers and iterables; every DataError case."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnx_mptq.data import (
    Batch,
    Interpolation,
    PreprocessSpec,
    input_specs,
    open_data,
    parse_preprocess_args,
    preprocess_from_timm,
    preprocess_image,
)
from onnx_mptq.errors import ConfigError, DataError

IMG = {"input": ((None, 1, 4, 4), np.float32)}
TWO = {"x": (("N", 3), np.float32), "y": (("N", 2), np.float32)}
SPEC1 = PreprocessSpec(size=4, mean=(0.5,), std=(0.5,))


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 4, 4)).astype(np.float32)


def collect(source) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    batches = list(source)
    x = np.concatenate([b.inputs["input"] for b in batches])
    labels = None if batches[0].labels is None else np.concatenate([b.labels for b in batches])
    return x, labels, [b.size for b in batches]


# ------------------------------------------------------------------------------------- npz


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streams_batches_with_labels(tmp_path, save):
    x, y = samples(10), np.arange(10) % 3
    p = tmp_path / "d.npz"
    save(p, input=x, labels=y)
    src = open_data(p, IMG, batch_size=4)
    assert src.num_samples == 10 and src.num_batches == 3 and src.reiterable
    got, labels, sizes = collect(src)
    assert sizes == [4, 4, 2]
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels, y)
    assert all(b.inputs["input"].dtype == np.float32 and b.labels.dtype == np.int64 for b in src)
    np.testing.assert_array_equal(collect(src)[0], x)  # re-iterable, restarts


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_member_streams_one_block_at_a_time(tmp_path, save, monkeypatch):
    """Stored and deflated members are read block by block from the zip stream (big-endian and
    Fortran-ordered arrays too); no read asks for more than one block."""
    import zipfile

    x = samples(9)
    p = tmp_path / "d.npz"
    save(p, input=x.astype(">f4"))
    asked: list[int] = []
    real = zipfile.ZipExtFile.readinto

    def readinto(self, b):
        asked.append(len(memoryview(b).cast("B")))
        return real(self, b)

    monkeypatch.setattr(zipfile.ZipExtFile, "readinto", readinto)
    got, _, sizes = collect(open_data(p, {"input": ((None, 1, 4, 4), np.float32)}, batch_size=4))
    np.testing.assert_array_equal(got, x)
    assert sizes == [4, 4, 1] and asked == [4 * 16 * 4, 4 * 16 * 4, 16 * 4]
    q = tmp_path / "f.npz"
    save(q, input=np.asfortranarray(x[:, 0, :, 0]))
    fortran = open_data(q, {"input": ((None, 4), np.float32)}, batch_size=5)
    np.testing.assert_array_equal(np.concatenate([b.inputs["input"] for b in fortran]), x[:, 0, :, 0])


def test_npz_corrupt_member_names_the_array(tmp_path):
    x = samples(200)
    p = tmp_path / "d.npz"
    np.savez(p, input=x)
    raw = bytearray(p.read_bytes())
    at = raw.find(x[190].tobytes()[:16])
    raw[at] ^= 0xFF  # one byte of sample 190, inside the stored member: its CRC no longer matches
    p.write_bytes(bytes(raw))
    src = open_data(p, IMG, batch_size=50)  # the header reads fine; the damage shows at the end of the stream
    with pytest.raises(DataError, match=r"d\.npz: array 'input' is truncated or corrupt \(BadZipFile: Bad CRC-32"):
        collect(src)


def test_npz_single_input_accepts_any_name_and_limit(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, images=samples(10))
    src = open_data(p, IMG, batch_size=4, limit=5)
    got, labels, sizes = collect(src)
    assert src.num_samples == 5 and sizes == [4, 1] and labels is None
    np.testing.assert_array_equal(got, samples(10)[:5])


def test_npz_float64_is_cast(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, input=samples(3).astype(np.float64))
    (b,) = list(open_data(p, IMG))
    assert b.inputs["input"].dtype == np.float32


def test_npz_two_inputs(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((5, 3), np.float32), y=np.zeros((5, 2), np.float32))
    (b,) = list(open_data(p, TWO, batch_size=8))
    assert b.inputs["x"].shape == (5, 3) and b.inputs["y"].shape == (5, 2)


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"^.*nope\.npz: no such file$"):
        open_data(tmp_path / "nope.npz", IMG)


def test_npz_unreadable(tmp_path):
    p = tmp_path / "bad.npz"
    p.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"bad\.npz: not a readable \.npz file"):
        open_data(p, IMG)


def test_npz_name_mismatch(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, a=np.ones((2, 3), np.float32), b=np.ones((2, 2), np.float32))
    with pytest.raises(DataError) as e:
        open_data(p, TWO)
    assert str(e.value) == f"{p}: data has arrays a, b; model inputs are x, y"


def test_npz_shape_mismatch(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, input=np.ones((3, 1, 5, 4), np.float32))
    with pytest.raises(DataError) as e:
        open_data(p, IMG)
    assert str(e.value) == (
        f"{p}: 'input' has shape (3, 1, 5, 4) but model input 'input' expects (?, 1, 4, 4) (dim 0 is the batch)"
    )


def test_npz_int_data_rejected(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, input=np.ones((3, 1, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"'input' is uint8 but model input 'input' is float32"):
        open_data(p, IMG)


def test_npz_nan_found_lazily_with_sample_index(tmp_path):
    x = samples(10)
    x[6, 0, 1, 2] = np.nan
    p = tmp_path / "d.npz"
    np.savez(p, input=x)
    it = iter(open_data(p, IMG, batch_size=4))
    next(it)  # first batch is clean
    with pytest.raises(DataError) as e:
        next(it)
    assert str(e.value) == f"{p}: input 'input' has NaN or inf in sample 6 (batch 1)"


def test_npz_empty(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, input=np.ones((0, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"d\.npz: no samples$"):
        list(open_data(p, IMG))


def test_npz_labels_length_and_type(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, input=samples(4), labels=np.arange(3))
    with pytest.raises(DataError, match=r"labels has 3 entries but the data has 4 samples$"):
        open_data(p, IMG)
    np.savez(p, input=samples(4), labels=np.arange(4.0))
    with pytest.raises(DataError, match=r"labels must be a 1-D integer array, got float64"):
        open_data(p, IMG)


def test_npz_fixed_batch_dim_wins(tmp_path, caplog):
    p = tmp_path / "d.npz"
    np.savez(p, input=samples(5))
    with caplog.at_level(logging.WARNING):
        src = open_data(p, {"input": ((2, 1, 4, 4), np.float32)}, batch_size=32)
    assert src.batch_size == 2 and src.num_samples == 4
    assert collect(src)[2] == [2, 2]
    assert "dropping the last 1 sample" in caplog.text


def test_input_specs_from_model():
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.zeros(4, np.float32), "b")],
    )
    assert input_specs(helper.make_model(graph)) == {"x": (("N", 4), np.dtype(np.float32))}


# ------------------------------------------------------------------------------- images


def make_image(path: Path, value: int, size=(6, 4), mode="L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, value, value)
    Image.new(mode, size, color).save(path)


def test_image_class_folders(tmp_path):
    make_image(tmp_path / "cat" / "b.png", 10)
    make_image(tmp_path / "cat" / "a.JPG", 20, mode="RGB")
    make_image(tmp_path / "dog" / "sub" / "c.bmp", 30)
    make_image(tmp_path / "dog" / "d.webp", 40)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    src = open_data(tmp_path, IMG, batch_size=3, preprocess=SPEC1)
    assert src.num_samples == 4 and src.class_names == ("cat", "dog")
    x, labels, sizes = collect(src)
    assert sizes == [3, 1] and x.shape == (4, 1, 4, 4)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    # order: cat/a.JPG, cat/b.png, dog/d.webp, dog/sub/c.bmp (sorted relative paths)
    np.testing.assert_allclose(x[:, 0, 0, 0], [(v / 255 - 0.5) / 0.5 for v in (20, 10, 40, 30)], atol=2e-2)


def test_image_flat_folder_has_no_labels(tmp_path):
    for i, v in enumerate((0, 255)):
        make_image(tmp_path / f"img{i}.jpeg", v)
    x, labels, _ = collect(open_data(tmp_path, IMG, preprocess=SPEC1))
    assert labels is None
    np.testing.assert_allclose(x[:, 0, 0, 0], [-1.0, 1.0], atol=2e-2)


def test_image_rgb_model_gets_three_channels(tmp_path):
    make_image(tmp_path / "a.png", 128)
    spec = PreprocessSpec(size=4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    (b,) = list(open_data(tmp_path, {"input": (("N", 3, 4, 4), np.float32)}, preprocess=spec))
    assert b.inputs["input"].shape == (1, 3, 4, 4)
    np.testing.assert_allclose(b.inputs["input"], (128 / 255 - 0.5) / 0.25, atol=1e-5)


def test_image_folder_needs_preprocess(tmp_path):
    make_image(tmp_path / "a.png", 1)
    with pytest.raises(DataError) as e:
        open_data(tmp_path, IMG)
    assert str(e.value) == f"{tmp_path}: image folder needs --preprocess timm:NAME or --size/--mean/--std"


def test_image_corrupt_file_named(tmp_path):
    make_image(tmp_path / "a.png", 1)
    (tmp_path / "b.png").write_bytes(b"garbage")
    it = iter(open_data(tmp_path, IMG, batch_size=1, preprocess=SPEC1))
    next(it)
    with pytest.raises(DataError, match=r"b\.png: cannot decode image"):
        next(it)


def test_image_size_mismatch(tmp_path):
    make_image(tmp_path / "a.png", 1)
    spec = PreprocessSpec(size=8, mean=(0.5,), std=(0.5,))
    with pytest.raises(DataError, match=r"preprocessing gives 1x8x8 images but model input 'input' expects \(\?, 1, 4, 4\)"):
        open_data(tmp_path, IMG, preprocess=spec)


def test_image_mixed_flat_and_classes(tmp_path):
    make_image(tmp_path / "a.png", 1)
    make_image(tmp_path / "cls" / "b.png", 1)
    with pytest.raises(DataError, match="mixes images"):
        open_data(tmp_path, IMG, preprocess=SPEC1)


def test_image_empty_folder(tmp_path):
    src = open_data(tmp_path, IMG, preprocess=SPEC1)
    with pytest.raises(DataError, match="no samples"):
        list(src)


def test_preprocess_resize_and_center_crop():
    # 8x4 (w x h) ramp; crop_pct 0.5 with size 2 -> shorter side 4 (no resize), center 2x2 crop
    arr = np.arange(32, dtype=np.uint8).reshape(4, 8) * 8
    im = Image.fromarray(arr, mode="L")
    spec = PreprocessSpec(size=2, mean=(0.0,), std=(1.0,), crop_pct=0.5, interpolation="nearest")
    out = preprocess_image(im, spec, channels=1)
    np.testing.assert_allclose(out[0] * 255, arr[1:3, 3:5], atol=1e-4)


@pytest.mark.torch
def test_preprocess_matches_timm_transform():
    pytest.importorskip("timm")
    import timm.data

    spec = PreprocessSpec(size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic", crop_pct=0.875)
    t = timm.data.create_transform(input_size=(3, 16, 16), interpolation="bicubic", mean=spec.mean, std=spec.std, crop_pct=0.875)
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (23, 31, 3), dtype=np.uint8), mode="RGB")
    np.testing.assert_allclose(preprocess_image(im, spec, 3), t(im).numpy(), atol=1e-5)


# ----------------------------------------------------------------------- readers/iterables


class Reader:
    def __init__(self, items):
        self.items, self.i, self.calls = items, 0, 0

    def get_next(self):
        self.calls += 1
        if self.i >= len(self.items):
            return None
        self.i += 1
        return self.items[self.i - 1]


def test_iterable_of_single_samples_is_rebatched():
    x = samples(5)
    items = [{"input": x[i], "labels": i} for i in range(5)]  # no batch dim
    src = open_data(items, IMG, batch_size=2)
    got, labels, sizes = collect(src)
    assert sizes == [2, 2, 1] and src.reiterable
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels, np.arange(5))


def test_one_dict_of_arrays_is_in_memory_data():
    x = samples(7)
    src = open_data({"input": x, "labels": np.arange(7)}, IMG, batch_size=3, limit=5)
    got, labels, sizes = collect(src)
    assert sizes == [3, 2] and src.reiterable
    np.testing.assert_array_equal(got, x[:5])
    np.testing.assert_array_equal(labels, np.arange(5))
    assert collect(src)[2] == [3, 2]  # read again
    with pytest.raises(DataError, match="NaN|nan|inf"):
        list(open_data({"input": np.full_like(x, np.nan)}, IMG))


def test_iterable_of_batches_split_and_merged():
    x = samples(7)
    items = [{"input": x[:1]}, {"input": x[1:6]}, {"input": x[6:]}]
    got, _, sizes = collect(open_data(items, IMG, batch_size=3))
    assert sizes == [3, 3, 1]
    np.testing.assert_array_equal(got, x)


def test_reader_protocol_limit_and_one_shot():
    x = samples(6)
    reader = Reader([{"input": x[i : i + 1]} for i in range(6)])
    src = open_data(reader, IMG, batch_size=4, limit=3)
    got, _, sizes = collect(src)
    assert sizes == [3] and reader.calls == 3  # stops pulling once the limit is reached
    np.testing.assert_array_equal(got, x[:3])
    with pytest.raises(DataError, match=r"data reader Reader can be read only once \(it has no rewind\(\)\)"):
        list(src)


def test_reader_with_rewind_is_reiterable():
    class Rewinding(Reader):
        def rewind(self):
            self.i = 0

    src = open_data(Rewinding([{"input": samples(2)}]), IMG)
    assert src.reiterable
    assert collect(src)[2] == [2] and collect(src)[2] == [2]


def test_generator_is_one_shot():
    src = open_data(({"input": samples(1)} for _ in range(2)), IMG)
    assert not src.reiterable and collect(src)[2] == [2]
    with pytest.raises(DataError, match="can be read only once"):
        list(src)


def test_iterable_name_mismatch_and_bad_item():
    with pytest.raises(DataError) as e:
        list(open_data([{"a": np.ones((1, 3), np.float32)}], TWO))
    assert str(e.value) == "data (list), item 0: data has arrays a; model inputs are x, y"
    with pytest.raises(DataError, match=r"item 0: expected a dict of input arrays, got int"):
        list(open_data([3], IMG))


def test_iterable_nan_and_empty():
    x = samples(3)
    x[2, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match=r"input 'input' has NaN or inf in sample 2 \(batch 1\)"):
        list(open_data([{"input": x}], IMG, batch_size=2))
    with pytest.raises(DataError, match=r"^data \(list\): no samples$"):
        list(open_data([], IMG))


def test_batch_objects_pass_through():
    b = Batch({"input": samples(3)}, np.array([1, 2, 3]))
    src = open_data([b], IMG)
    assert src.num_samples == 3
    np.testing.assert_array_equal(collect(src)[1], [1, 2, 3])


# ---------------------------------------------------------------------------- CLI helper


def test_parse_preprocess_args():
    assert parse_preprocess_args(None) is None
    spec = parse_preprocess_args(None, size="28", mean="0.1307", std="0.3081")
    assert spec == PreprocessSpec(size=28, mean=(0.1307,), std=(0.3081,), interpolation=Interpolation.BILINEAR, crop_pct=1.0)
    spec = parse_preprocess_args(None, size="32,48", mean="0.5,0.5,0.5", std=[0.2, 0.2, 0.2], interpolation="bicubic", crop_pct=0.9)
    assert spec.hw == (32, 48) and spec.interpolation is Interpolation.BICUBIC
    with pytest.raises(ConfigError, match=r"^--std missing: give --size, --mean and --std together"):
        parse_preprocess_args(None, size=28, mean=0.5)
    with pytest.raises(ConfigError, match=r"--preprocess must look like timm:MODEL_NAME, got 'foo'"):
        parse_preprocess_args("foo")
    with pytest.raises(ConfigError, match=r"preprocess.interpolation must be one of bilinear, bicubic, nearest"):
        parse_preprocess_args(None, size=28, mean=0.5, std=0.5, interpolation="lanczos")


def test_preprocess_from_timm_without_timm(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(DataError, match=r"needs timm; install the export extra"):
        preprocess_from_timm("vit_tiny_patch16_224")


@pytest.mark.torch
def test_preprocess_from_timm():
    pytest.importorskip("timm")
    spec = parse_preprocess_args("timm:vit_tiny_patch16_224", crop_pct=1.0)
    assert spec == PreprocessSpec(size=224, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic", crop_pct=1.0, channels=3)
    with pytest.raises(DataError, match="timm does not know the model 'no_such_model_xyz'"):
        preprocess_from_timm("no_such_model_xyz")


# ------------------------------------------------------------- labels files, class maps, slices


def _flat(tmp_path: Path, names: list[str]) -> Path:
    root = tmp_path / "flat"
    for i, n in enumerate(names):
        make_image(root / n, 10 * i)
    return root


def _pixel_order(x: np.ndarray) -> list[int]:
    """Which of the _flat images (value 10 * i) each sample is."""
    return [int(round(((v * 0.5 + 0.5) * 255) / 10)) for v in x[:, 0, 0, 0]]


@pytest.mark.parametrize("text", [
    "filename,label\nb.png,4\na.png,7\nc.png,0\nextra_not_in_folder.png,3\n",  # CSV with a header, extra rows
    "a.png 7\n# comment\nb.png 4\n\nc.png 0\n",  # whitespace (shared/data's labels.txt form)
    "7\n4\n0\n",  # one label per sorted file (ImageNet's validation ground truth form)
])
def test_labels_file_for_a_flat_folder(tmp_path, text):
    root = _flat(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "labels.txt").write_text(text)
    x, labels, _ = collect(open_data(root, IMG, preprocess=SPEC1, labels=tmp_path / "labels.txt"))
    np.testing.assert_array_equal(labels, [7, 4, 0])
    assert _pixel_order(x) == [0, 1, 2]


def test_labels_file_errors_name_the_file(tmp_path):
    root = _flat(tmp_path, ["a.png", "b.png", "c.png"])
    lab = tmp_path / "labels.csv"
    lab.write_text("a.png,1\nb.png,2\n")
    with pytest.raises(DataError) as e:
        open_data(root, IMG, preprocess=SPEC1, labels=lab)
    assert str(e.value) == f"{lab}: no label for c.png in {root}"
    lab.write_text("1\n2\n")
    with pytest.raises(DataError, match=r"2 labels \(one per line\) but .* holds 3 images"):
        open_data(root, IMG, preprocess=SPEC1, labels=lab)
    lab.write_text("a.png,n01\nb.png,2\nc.png,3\n")
    with pytest.raises(DataError, match=r"label 'n01' is a class name; give --class-map"):
        open_data(root, IMG, preprocess=SPEC1, labels=lab)
    with pytest.raises(DataError, match="no such labels file"):
        open_data(root, IMG, preprocess=SPEC1, labels=tmp_path / "nope.txt")
    make_image(tmp_path / "classes" / "cat" / "a.png", 1)
    with pytest.raises(DataError, match="has class sub-folders, which give the labels"):
        open_data(tmp_path / "classes", IMG, preprocess=SPEC1, labels=lab)
    np.savez(tmp_path / "d.npz", input=samples(2))
    with pytest.raises(DataError, match="--labels applies to image folders only"):
        open_data(tmp_path / "d.npz", IMG, labels=lab)


def test_labels_file_of_class_names_through_a_class_map(tmp_path):
    root = _flat(tmp_path, ["a.png", "b.png"])
    (tmp_path / "labels.csv").write_text("a.png,n02\nb.png,n01\n")
    (tmp_path / "map.txt").write_text("n01 7\nn02 3\n")
    _, labels, _ = collect(open_data(root, IMG, preprocess=SPEC1, labels=tmp_path / "labels.csv", class_map=tmp_path / "map.txt"))
    np.testing.assert_array_equal(labels, [3, 7])


@pytest.mark.parametrize("name,text", [
    ("map.txt", "n01440764 0\nn99 998\nn50 4\n"),
    ("map.csv", "n01440764,0\nn50,4\nn99,998\n"),
    ("synset_words.txt", "n01440764 tench, Tinca tinca\nx1 a\nx2 b\nx3 c\nn50 cat, feline\n"),  # index = line
    ("map.json", '{"n01440764": 0, "n50": 4}'),
    ("imagenet_class_index.json", '{"0": ["n01440764", "tench"], "4": ["n50", "cat"]}'),
])
def test_class_map_numbers_sub_folders_as_the_model_does(tmp_path, name, text):
    # an ImageNet subset: only two classes, whose sorted positions (0, 1) are not their indices (0, 4)
    make_image(tmp_path / "data" / "n50" / "a.png", 10)
    make_image(tmp_path / "data" / "n01440764" / "b.png", 20)
    (tmp_path / name).write_text(text)
    src = open_data(tmp_path / "data", IMG, preprocess=SPEC1, class_map=tmp_path / name)
    _, labels, _ = collect(src)
    np.testing.assert_array_equal(labels, [0, 4])  # n01440764/b.png, n50/a.png
    _, plain, _ = collect(open_data(tmp_path / "data", IMG, preprocess=SPEC1))
    np.testing.assert_array_equal(plain, [0, 1])  # without the map: sorted positions


def test_class_map_must_cover_every_class_folder(tmp_path):
    make_image(tmp_path / "data" / "n50" / "a.png", 10)
    make_image(tmp_path / "data" / "n77" / "a.png", 10)
    (tmp_path / "map.txt").write_text("n50 4\n")
    with pytest.raises(DataError) as e:
        open_data(tmp_path / "data", IMG, preprocess=SPEC1, class_map=tmp_path / "map.txt")
    assert str(e.value) == f"{tmp_path / 'data'}: class folder 'n77' is not in the class map"


def test_split_and_offset_select_positions_in_a_folder(tmp_path):
    root = _flat(tmp_path, [f"{i:02d}.png" for i in range(10)])
    pick = lambda **kw: _pixel_order(collect(open_data(root, IMG, preprocess=SPEC1, batch_size=3, **kw))[0])  # noqa: E731
    fold, rest = pick(split="fold:1/4"), pick(split="rest:1/4")
    assert fold == [1, 5, 9] and rest == [0, 2, 3, 4, 6, 7, 8]
    assert sorted(fold + rest) == list(range(10))
    assert pick(offset=7) == [7, 8, 9]
    assert pick(offset=2, limit=3) == [2, 3, 4]
    assert pick(split="rest:1/4", offset=1, limit=2) == [2, 3]  # split, then offset, then limit
    src = open_data(root, IMG, preprocess=SPEC1, split="rest:1/4", limit=5)
    assert src.num_samples == 5 and "rest:1/4" in src.name


def test_split_of_a_labelled_folder_keeps_labels_aligned(tmp_path):
    for i in range(6):
        make_image(tmp_path / "d" / ("cat" if i < 3 else "dog") / f"{i}.png", 10 * i)
    x, labels, _ = collect(open_data(tmp_path / "d", IMG, preprocess=SPEC1, split="fold:0/2"))
    assert _pixel_order(x) == [0, 2, 4]
    np.testing.assert_array_equal(labels, [0, 0, 1])


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_split_offset_limit_on_npz_and_iterables(tmp_path, save):
    x, y = samples(11), np.arange(11)
    p = tmp_path / "d.npz"
    save(p, input=x, labels=y)
    want = np.arange(11)[np.arange(11) % 3 != 0][1:][:4]  # rest:0/3, offset 1, limit 4 -> [2, 4, 5, 7]
    for data in (p, [{"input": x[i:i + 2], "labels": y[i:i + 2]} for i in range(0, 11, 2)]):
        src = open_data(data, IMG, batch_size=3, split="rest:0/3", offset=1, limit=4)
        got_x, got_y, sizes = collect(src)
        np.testing.assert_array_equal(got_y, want)
        np.testing.assert_array_equal(got_x, x[want])
        assert sizes == [3, 1]
    assert open_data(p, IMG, split="fold:0/3").num_samples == 4


@pytest.mark.parametrize("spec", ["0/3", "fold:3/3", "fold:0/1", "rest:a/b", "half"])
def test_bad_split_spec(tmp_path, spec):
    np.savez(tmp_path / "d.npz", input=samples(2))
    with pytest.raises(ConfigError, match="split"):
        open_data(tmp_path / "d.npz", IMG, split=spec)
    with pytest.raises(ConfigError, match="offset must be an integer >= 0"):
        open_data(tmp_path / "d.npz", IMG, offset=-1)
