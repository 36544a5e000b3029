"""examples/mnist.py: the IDX reader, the data-finding and offline paths, the models, and one
short end-to-end run of every mode on a tiny synthetic IDX dataset written to a temp folder."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from ttlayers import TTLinear

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist.py"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
TRAIN_LINE = re.compile(r"^Train Epoch: (\d+) \[(\d+)/(\d+) \((\d+)%\)\]\tLoss: ([\d.]+)$", re.M)
TEST_LINE = re.compile(r"Test set: Average loss: ([\d.]+), Accuracy: (\d+)/(\d+) \(([\d.]+)%\)")


@pytest.fixture(scope="module")
def mnist():
    spec = importlib.util.spec_from_file_location("mnist_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def idx_bytes(array: np.ndarray) -> bytes:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_dataset(folder: Path, n_train: int = 256, n_test: int = 128, seed: int = 0) -> Path:
    """Ten classes of MNIST-like images: each a fixed sparse pattern of bright pixels, with
    10 % of them dropped and 3 % stray ones added. Learnable in a few steps."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((10, 28, 28)) < 0.15
    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    for n in (n_train, n_test):
        labels = rng.integers(0, 10, size=n)
        images = patterns[labels] & (rng.random((n, 28, 28)) > 0.1)
        images |= rng.random((n, 28, 28)) < 0.03
        arrays += [images * 255, labels]
    for name, array in zip(FILES, arrays, strict=True):
        (folder / name).write_bytes(gzip.compress(idx_bytes(array)))
    return folder


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tiny") / "data")


# ---------------------------------------------------------------------------------------
# IDX reader


@pytest.mark.parametrize("compressed", [True, False])
def test_read_idx_round_trips(mnist, tmp_path, compressed):
    images = np.arange(3 * 28 * 28, dtype=np.uint64).reshape(3, 28, 28) % 256
    labels = np.array([7, 0, 9])
    for name, array in (("images", images), ("labels", labels)):
        path = tmp_path / (name + (".gz" if compressed else ""))
        raw = idx_bytes(array)
        path.write_bytes(gzip.compress(raw) if compressed else raw)
        result = mnist.read_idx(path)
        assert result.dtype == np.uint8
        np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_truncated_data(mnist, tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28)))[:-100]))
    with pytest.raises(mnist.DataError, match=r"train-images-idx3-ubyte\.gz is truncated"):
        mnist.read_idx(path)


def test_read_idx_rejects_a_cut_gzip_stream(mnist, tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(1000)))[:-20])
    with pytest.raises(mnist.DataError, match=r"t10k-labels-idx1-ubyte\.gz is corrupt"):
        mnist.read_idx(path)


def test_read_idx_rejects_damaged_compressed_data(mnist, tmp_path):
    # The gzip header intact, the deflate stream damaged: zlib.error, which is no OSError.
    path = tmp_path / "train-images-idx3-ubyte.gz"
    packed = bytearray(gzip.compress(idx_bytes(np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256)))
    packed[20:40] = b"\xff" * 20
    path.write_bytes(bytes(packed))
    with pytest.raises(mnist.DataError, match=r"train-images-idx3-ubyte\.gz is corrupt"):
        mnist.read_idx(path)


def test_a_file_of_no_images_is_refused_before_training(mnist, tmp_path, capsys):
    folder = write_dataset(tmp_path / "data", n_train=8, n_test=4)
    (folder / FILES[2]).write_bytes(gzip.compress(idx_bytes(np.zeros((0, 28, 28)))))
    (folder / FILES[3]).write_bytes(gzip.compress(idx_bytes(np.zeros(0))))
    code = mnist.main(["--data-dir", str(folder), "--no-download", "--no-accel"])
    assert code == 2
    err = capsys.readouterr()
    assert "must hold one or more 28x28 images" in err.err
    assert "Train Epoch" not in err.out


@pytest.mark.parametrize("header", [b"\x00\x00\x09\x01", b"\x1f\x8b\x08\x00", b"\x00\x00"])
def test_read_idx_rejects_wrong_magic_number(mnist, tmp_path, header):
    path = tmp_path / "labels"
    path.write_bytes(header + b"\x00" * 20)
    with pytest.raises(mnist.DataError, match=r"labels is not an IDX file.*magic number"):
        mnist.read_idx(path)


@pytest.mark.parametrize("compressed", [False, True])
def test_read_idx_says_an_empty_file_is_empty(mnist, tmp_path, compressed):
    path = tmp_path / ("labels.gz" if compressed else "labels")
    path.write_bytes(gzip.compress(b"") if compressed else b"")
    with pytest.raises(mnist.DataError, match=r"labels(\.gz)? is empty; delete it and retry"):
        mnist.read_idx(path)


def test_load_dataset_names_the_corrupt_file_and_the_script_exits_2(mnist, tmp_path, capsys):
    folder = write_dataset(tmp_path / "data", n_train=8, n_test=4)
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-8])
    code = mnist.main(["--data-dir", str(folder), "--no-download", "--no-accel"])
    assert code == 2
    assert f"{bad} is corrupt or truncated" in capsys.readouterr().err


def test_load_dataset_normalizes_and_finds_torchvision_layout(mnist, tmp_path):
    write_dataset(tmp_path / "FashionMNIST" / "raw", n_train=16, n_test=8)
    train, test = mnist.load_dataset("fashion-mnist", tmp_path, allow_download=False)
    images, labels = train.tensors
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and len(test) == 8
    assert images.min() == pytest.approx((0 - 0.2860) / 0.3530, abs=1e-3)


def test_load_dataset_finds_torchvision_layout_below_the_default_folder(mnist, tmp_path):
    # The default --data-dir is ~/.pytorch/MNIST; torchvision with root ~/.pytorch puts its
    # files in ~/.pytorch/MNIST/raw.
    write_dataset(tmp_path / "MNIST" / "raw", n_train=16, n_test=8)
    train, test = mnist.load_dataset("mnist", tmp_path / "MNIST", allow_download=False)
    assert len(train) == 16 and len(test) == 8


def test_load_dataset_says_when_it_uses_a_system_copy(mnist, tmp_path, monkeypatch, capsys):
    system = tmp_path / "usr-share"
    write_dataset(system, n_train=4, n_test=4)
    fashion = dataclasses.replace(mnist.DATASETS["fashion-mnist"], system_dirs=(str(system),))
    monkeypatch.setitem(mnist.DATASETS, "fashion-mnist", fashion)
    train, _ = mnist.load_dataset("fashion-mnist", tmp_path / "typo", allow_download=False)
    assert len(train) == 4
    out = capsys.readouterr().out
    assert f"files in {system} (none in {tmp_path / 'typo'})" in out
    # With some of the files in --data-dir, the message names the ones it lacks.
    partial = tmp_path / "partial"
    write_dataset(partial, n_train=2, n_test=2)
    (partial / mnist.FILES[3]).unlink()
    train, _ = mnist.load_dataset("fashion-mnist", partial, allow_download=False)
    assert len(train) == 4  # the system copy's
    assert f"files in {system} ({partial} lacks {mnist.FILES[3]})" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# Missing data: the offline message, downloads


def test_offline_message_exits_2_without_traceback(tmp_path):
    empty = tmp_path / "nothing-here"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--data-dir", str(empty), "--no-download"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "MNIST files are not on this machine" in result.stderr
    assert str(empty) in result.stderr
    for name in FILES:
        assert name in result.stderr


@pytest.mark.parametrize("fashion_here", [True, False])
def test_offline_message_points_to_local_fashion_mnist(mnist, tmp_path, monkeypatch, fashion_here):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.pytorch/FashionMNIST
    system = tmp_path / "usr-share"
    if fashion_here:
        write_dataset(system, n_train=4, n_test=4)
    fashion = dataclasses.replace(mnist.DATASETS["fashion-mnist"], system_dirs=(str(system),))
    monkeypatch.setitem(mnist.DATASETS, "fashion-mnist", fashion)
    message = mnist.missing_message("mnist", tmp_path / "data", "offline")
    assert ("--dataset fashion-mnist` will run" in message) == fashion_here
    assert "apt-get install dataset-fashion-mnist" in mnist.missing_message(
        "fashion-mnist", tmp_path / "data", "offline"
    )


def test_unreachable_mirror_gives_the_offline_message(mnist, tmp_path, monkeypatch):
    # Port 9 (discard) on the loopback is closed: the connection is refused at once.
    unreachable = dataclasses.replace(mnist.DATASETS["mnist"], mirrors=("http://127.0.0.1:9/",))
    monkeypatch.setitem(mnist.DATASETS, "mnist", unreachable)
    with pytest.raises(mnist.DataError, match="could not be downloaded") as error:
        mnist.load_dataset("mnist", tmp_path / "data", allow_download=True)
    assert "train-images-idx3-ubyte.gz" in str(error.value)


def test_download_checks_the_md5_and_loads(mnist, tmp_path, monkeypatch):
    import hashlib

    mirror = write_dataset(tmp_path / "mirror", n_train=8, n_test=4)
    md5 = tuple(hashlib.md5((mirror / name).read_bytes()).hexdigest() for name in FILES)
    info = dataclasses.replace(
        mnist.DATASETS["mnist"], mirrors=("http://127.0.0.1:9/", mirror.as_uri() + "/"), md5=md5
    )
    monkeypatch.setitem(mnist.DATASETS, "mnist", info)
    train, test = mnist.load_dataset("mnist", tmp_path / "data", allow_download=True)
    assert (len(train), len(test)) == (8, 4)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(FILES)

    wrong = dataclasses.replace(info, md5=("0" * 32,) * 4)
    monkeypatch.setitem(mnist.DATASETS, "mnist", wrong)
    with pytest.raises(mnist.DataError, match="checksum mismatch"):
        mnist.load_dataset("mnist", tmp_path / "other", allow_download=True)
    assert list((tmp_path / "other").iterdir()) == []  # nothing half-written left behind


# ---------------------------------------------------------------------------------------
# Models


def test_ttnet_seed_init_is_the_write_up_network(mnist):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the one expected warning is silenced in the example
        layer = mnist.ttnet_layer(50, "seed")
    assert layer.ranks == (1, 50, 1)
    torch.manual_seed(1)
    tt1, tt2 = torch.rand(28 * 28, 50), torch.rand(50, 10)  # the write-up's TTNet.__init__
    torch.testing.assert_close(layer.cores[0].reshape(784, 50), tt1, rtol=0, atol=0)
    torch.testing.assert_close(layer.cores[1].reshape(50, 10), tt2, rtol=0, atol=0)
    x = torch.randn(5, 784, dtype=torch.float64)
    expected = torch.einsum("ni,ia,aj->nj", x, tt1.double(), tt2.double())
    torch.testing.assert_close(layer.double()(x), expected)


def test_ttnet_library_init_is_a_full_rank_784x10_layer(mnist):
    model = mnist.build_model("ttnet", 50)
    assert model.classifier.ranks == (1, 10, 1)
    assert mnist.count_parameters(model) == 784 * 10 + 10 * 10


def test_ttmlp_has_at_most_a_fifth_of_the_dense_mlps_parameters(mnist):
    ttmlp = mnist.build_model("ttmlp", mnist.DEFAULT_RANK["ttmlp"])
    dense = mnist.build_model("dense", None)
    dense_256 = 784 * 256 + 256 + 256 * 10 + 10  # the 784-256-10 reference MLP
    assert mnist.count_parameters(dense) == mnist.dense_baseline("dense")[1]
    assert 5 * mnist.count_parameters(ttmlp) <= min(dense_256, mnist.count_parameters(dense))


def test_same_seed_same_run(mnist, tiny_data, capsys):
    # In process, with the write-up's init (the subprocess runs below cover the other models).
    argv = ["--data-dir", str(tiny_data), "--no-download", "--no-accel", "--init", "seed"]
    argv += ["--epochs", "1", "--batch-size", "16", "--log-interval", "1"]
    outputs = []
    for _ in range(2):
        assert mnist.main(argv) == 0
        outputs.append(re.sub(r"[\d.]+ s\b", "", capsys.readouterr().out))
    assert outputs[0] == outputs[1]
    assert "ttnet (seed init), Adam lr 0.001 " in outputs[0]  # the write-up's learning rate
    losses = [float(loss) for *_, loss in TRAIN_LINE.findall(outputs[0])]
    assert losses[0] > 20  # all-positive factors: huge first logits, as in the write-up's log
    assert np.mean(losses[-4:]) < 0.9 * np.mean(losses[:4]), losses


# ---------------------------------------------------------------------------------------
# End to end, as a user runs it


MODES = {
    "ttnet": ["--model", "ttnet"],
    "ttmlp": ["--model", "ttmlp"],
    "dense": ["--model", "dense"],
    "convert": ["--convert"],
    "calibrate": ["--convert", "--calibrate", "64"],
    "convert-only": ["--convert", "--finetune-epochs", "0"],
}
CONVERTS = {"convert", "calibrate", "convert-only"}


@pytest.mark.parametrize("mode", MODES)
def test_end_to_end(mnist, tiny_data, tmp_path, mode):
    args = ["--data-dir", str(tiny_data), "--no-download", "--no-accel", "--save-model"]
    args += ["--epochs", "1", "--batch-size", "16", "--test-batch-size", "64"]
    args += ["--log-interval", "1", *MODES[mode]]
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny data: more threads only contend
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout

    # The log lines of PyTorch's example, 256 images / 16 per batch, every batch logged.
    trains = TRAIN_LINE.findall(out)
    tests = TEST_LINE.findall(out)
    # --convert: 1 epoch dense + 1 fine-tuning (none with --finetune-epochs 0)
    epochs = 2 if mode in CONVERTS - {"convert-only"} else 1
    assert len(trains) == 16 * epochs
    assert trains[0][:4] == ("1", "0", "256", "0")
    assert trains[15][:4] == ("1", "240", "256", "94")
    # + before fine-tuning; with --calibrate, + plain TT-SVD before fine-tuning too
    assert len(tests) == epochs + {"convert": 1, "calibrate": 2, "convert-only": 1}.get(mode, 0)
    assert all(total == "128" for _, _, total, _ in tests)
    losses = [float(loss) for *_, loss in trains]
    for start in range(0, len(losses), 16):  # training, then fine-tuning
        first, last = losses[start : start + 4], losses[start + 12 : start + 16]
        assert np.mean(last) < 0.9 * np.mean(first), losses
    assert re.search(r"^Parameters: [\d,]+ \(.*compression [\d.]+x\)$", out, re.M)
    assert len(re.findall(r"^Epoch time: [\d.]+ s$", out, re.M)) == epochs
    speed = "" if mode == "convert-only" else r" [\d.]+ s/epoch"
    assert re.search(rf"^Result: .* test accuracy [\d.]+%, .*x\),{speed} on cpu$", out, re.M)

    # --save-model wrote the model that was tested last, loadable into a fresh one.
    model_name = "dense" if mode in CONVERTS else MODES[mode][1]
    model = mnist.build_model(model_name, mnist.DEFAULT_RANK.get(model_name))
    if mode == "calibrate":
        assert "calibrated on 64 samples" in out  # the data-aware report's header
        before = r"^Before fine-tuning: plain TT-SVD [\d.]+%, calibrated on 64 images [\d.]+%"
        assert re.search(before, out, re.M)
    if mode in CONVERTS:
        assert "tensorize_: 1 layer(s) converted" in out
        tuned = "not fine-tuned" if mode == "convert-only" else "-> fine-tuned"
        conversion = rf"^Conversion: dense [\d.]+% -> converted [\d.]+%.*{tuned}"
        assert re.search(conversion, out, re.M)
        assert "nan" not in out
        # A TTLinear of the same modes takes the checkpoint's ranks when it loads it.
        in_modes, out_modes = mnist.HIDDEN_MODES
        model.hidden = TTLinear(784, mnist.HIDDEN, 1, in_modes=in_modes, out_modes=out_modes)
    name = "dense_tensorized" if mode in CONVERTS else mode
    model.load_state_dict(torch.load(tmp_path / f"mnist_{name}.pt", weights_only=True))
    _, test_set = mnist.load_dataset("mnist", tiny_data, allow_download=False)
    images, labels = test_set.tensors
    with torch.no_grad():
        correct = (model(images).argmax(1) == labels).sum().item()
    assert int(tests[-1][1]) == correct


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--convert", "--eps", "1.5"], "--eps is a relative error bound"),
        (["--rank", "0"], "--rank takes a number from 1 to "),
        (["--batch-size", "0"], "--batch-size takes a number from 1 to "),
        (["--log-interval", "0"], "--log-interval takes a number from 1 to "),
        (["--epochs", "0"], "--epochs takes a number from 1 to "),
        (["--calibrate", "-3"], "--calibrate takes a number from 0 to "),
        (["--test-batch-size", str(2**64)], "--test-batch-size takes a number from 1 to "),
        (["--seed", str(2**64)], "--seed takes a number from"),
        (["--model", "ttmlp", "--eps", "0.5"], "--eps applies to --convert only"),
        (["--model", "ttmlp", "--finetune-epochs", "3"], "--finetune-epochs applies"),
        (["--model", "dense", "--rank", "3"], "--rank applies to the TT models"),
        (["--model", "ttmlp", "--init", "seed"], "--init seed applies to --model ttnet only"),
        (["--gamma", "-1"], "--gamma is a learning rate factor in (0, 1]"),
        (["--gamma", "0"], "--gamma is a learning rate factor in (0, 1]"),
        (["--lr", "inf"], "--lr must be positive and finite"),
        (["--convert", "--finetune-lr", "nan"], "--finetune-lr must be positive and finite"),
        (
            ["--convert", "--finetune-epochs", "0", "--finetune-lr", "1e-4"],
            "--finetune-lr has no effect with --finetune-epochs 0",
        ),
    ],
)
def test_bad_flags_fail_before_any_training(mnist, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        mnist.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_convert_flags_get_their_defaults(mnist):
    args = mnist.parse_args(["--convert"])
    assert args.finetune_epochs == 1 and args.finetune_lr == args.lr / 10
    # The default, given explicitly, is accepted for every model (it was an error but for
    # ttnet).
    for argv in (["--convert"], ["--model", "ttmlp"], ["--model", "dense"]):
        assert mnist.parse_args([*argv, "--init", "library"]).init == "library"


def test_few_calibration_images_get_a_note_and_the_data_dir_its_home(mnist, capsys):
    # 16 images gave a worse model than plain TT-SVD on the test set (78.7 % against 82.4 %
    # on Fashion-MNIST); and --data-dir=~/x reaches the script with the ~ unexpanded.
    args = mnist.parse_args(["--convert", "--calibrate", "16", "--data-dir=~/idx"])
    assert "fewer images than the layer's 784 inputs" in capsys.readouterr().err
    assert args.data_dir == Path("~/idx").expanduser()
    mnist.parse_args(["--convert", "--calibrate", "1024"])
    assert "fewer images" not in capsys.readouterr().err
    # A training set smaller than asked for gets the note when the images are used.
    small = TensorDataset(torch.zeros(300, 1, 28, 28), torch.zeros(300, dtype=torch.int64))
    assert len(mnist.calibration_images(small, 1024)) == 300
    assert "the training set has 300 images" in capsys.readouterr().err
    assert len(mnist.calibration_images(small, 200)) == 200  # parse_args noted this one
    large = TensorDataset(torch.zeros(800, 1, 28, 28), torch.zeros(800, dtype=torch.int64))
    assert len(mnist.calibration_images(large, 1024)) == 800
    assert capsys.readouterr().err == ""
