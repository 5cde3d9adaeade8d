"""Weighted k-NN against a brute-force numpy implementation; the CLI on ONNX and checkpoints."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from tests.training.conftest import tiny_args, write_fashion_mnist
from training.eval_knn import knn_classifier, main


def numpy_knn(train_x, train_y, test_x, test_y, k, t, num_classes):
    top1 = top5 = 0
    for x, y in zip(test_x, test_y, strict=True):
        sims = train_x @ x
        order = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in order:
            votes[train_y[j]] += np.exp(sims[j] / t)
        # a class no neighbour voted for is no prediction (the reference's 1000-class vote
        # matrix puts such classes below the voted ones in practice)
        ranked = [c for c in np.argsort(-votes, kind="stable") if votes[c] > 0]
        top1 += ranked[0] == y
        top5 += y in ranked[: min(5, k)]
    return 100 * top1 / len(test_y), 100 * top5 / len(test_y)


@pytest.mark.parametrize("k", [1, 10, 20, 200])
def test_knn_matches_brute_force_on_digits(k):
    digits = load_digits()
    x = digits.data.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    x += rng.normal(scale=1e-6, size=x.shape)  # break exact similarity ties
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    train_x, test_x = x[:1200], x[1200:1500]
    train_y, test_y = digits.target[:1200], digits.target[1200:1500]
    got = knn_classifier(
        torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x),
        torch.from_numpy(test_y), k, 0.07, chunk_size=64,
    )  # fmt: skip
    want = numpy_knn(train_x, train_y, test_x, test_y, k, 0.07, 10)
    assert got == pytest.approx(want)
    assert got[0] > 85  # digits are easy: a sanity bound


def test_top5_counts_only_classes_that_got_votes():
    """With 3 classes every class is in a top 5; a class without a vote must not count."""
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]))
    train_y = torch.tensor([0, 0, 2])
    test = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [1.0, 0.02]]))
    test_y = torch.tensor([1, 2])  # class 1 has no training image; class 2 is the far one
    top1, top5 = knn_classifier(train, train_y, test, test_y, k=2, temperature=0.07)
    assert (top1, top5) == (0.0, 0.0)  # the 2 nearest both vote 0
    _, top5 = knn_classifier(train, train_y, test, test_y, k=3, temperature=0.07)
    assert top5 == 50.0  # k=3 reaches the class-2 image: a hit for the second test image only


def test_a_small_temperature_does_not_overflow():
    """exp(sim / T) overflows float32 below T ~ 0.011; the votes must still rank right."""
    digits = load_digits()
    x = torch.nn.functional.normalize(torch.from_numpy(digits.data).float(), dim=1)
    y = torch.from_numpy(digits.target)
    got = knn_classifier(x[:1200], y[:1200], x[1200:1500], y[1200:1500], 20, 0.005)
    want = numpy_knn(
        x[:1200].double().numpy(), digits.target[:1200], x[1200:1500].double().numpy(),
        digits.target[1200:1500], 20, 0.005, 10,
    )  # fmt: skip
    assert got == pytest.approx(want)
    assert got[0] > 85


def test_far_voters_still_rank_above_classes_without_votes():
    """At T = 0.01 a neighbour at cos -0.3 weighs exp(-110) times the nearest one (cos 0.8):
    float32 would flush it to 0 and tie it with unvoted classes; the reference (which does
    not overflow here, 0.8 / 0.01 = 80) ranks it right after the nearest class."""
    near, far = math.acos(0.8), math.acos(-0.3)
    angles = [near] + [far] * 5
    train = torch.tensor([[math.cos(a), math.sin(a)] for a in angles])
    train_y = torch.tensor([0, 15, 15, 1, 2, 3])
    test, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([15])
    sims = (test @ train.T).double()[0]
    votes = torch.zeros(20, dtype=torch.float64).index_add_(0, train_y, (sims / 0.01).exp())
    assert 15 in votes.argsort(descending=True)[:5].tolist()  # the reference formula's hit
    top1, top5 = knn_classifier(train, train_y, test, test_y, 6, 0.01, num_classes=20)
    assert (top1, top5) == (0.0, 100.0)


def test_cli_on_onnx_model_and_checkpoint(
    tmp_path, monkeypatch, capsys, tiny_model_repository, image_dir
):
    root = write_fashion_mnist(tmp_path / "fm", n_train=60, n_test=20)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    onnx_path = tiny_model_repository / "tiny" / "1" / "model.onnx"
    assert (
        main(["--onnx", str(onnx_path), "--dataset", "fashion-mnist", "--nb_knn", "5", "20"]) == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["k"] for r in lines] == [5, 20] and lines[0]["n_test"] == 20
    assert lines[0]["top1"] > 50  # three classes with class-specific bands

    from training.pretrain import main as pretrain

    out = tmp_path / "run"
    assert pretrain(tiny_args(image_dir, out, "--epochs", "1", "--warmup_epochs", "0")) == 0
    argv = ["--checkpoint", str(out / "checkpoint.pth"), "--train_dir", str(image_dir)]
    assert main([*argv, "--val_dir", str(image_dir), "--nb_knn", "1"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["top1"] == 100.0  # every val image is its own nearest train neighbour


def test_raw_pixel_baseline_matches_numpy(tmp_path, monkeypatch, capsys):
    import gzip

    root = write_fashion_mnist(tmp_path / "fm", n_train=60, n_test=20, seed=3)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    assert main(["--raw_pixels", "--dataset", "fashion-mnist", "--nb_knn", "5"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])

    def load(prefix, offset, shape):
        with gzip.open(root / prefix) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)

    train_x = load("train-images-idx3-ubyte.gz", 16, (60, -1)).astype(np.float64)
    test_x = load("t10k-images-idx3-ubyte.gz", 16, (20, -1)).astype(np.float64)
    train_y = load("train-labels-idx1-ubyte.gz", 8, (60,))
    test_y = load("t10k-labels-idx1-ubyte.gz", 8, (20,))
    train_x /= np.linalg.norm(train_x, axis=1, keepdims=True)
    test_x /= np.linalg.norm(test_x, axis=1, keepdims=True)
    want = numpy_knn(train_x, train_y, test_x, test_y, 5, 0.07, 3)
    assert (got["top1"], got["top5"]) == pytest.approx(want)


def test_cli_user_errors_are_one_line(tmp_path, capsys, image_dir):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf")
    fm = ["--dataset", "fashion-mnist"]
    assert main(["--onnx", str(tmp_path / "missing.onnx"), *fm]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["--onnx", str(bad), *fm]) == 1
    err = capsys.readouterr().err
    assert "is not a loadable ONNX model" in err and "Traceback" not in err

    # An evaluation class that the training split lacks would be silently unclassifiable.
    val = tmp_path / "val"
    (val / "cats").mkdir(parents=True)
    (val / "horses").mkdir()
    argv = ["--raw_pixels", "--train_dir", str(image_dir), "--val_dir", str(val)]
    assert main(argv) == 1
    assert "class folders that the training split lacks: horses" in capsys.readouterr().err

    # Raw pixels of images of several sizes cannot be compared without a common size.
    argv = ["--raw_pixels", "--train_dir", str(image_dir), "--val_dir", str(image_dir)]
    assert main(argv) == 1
    assert "pass --resolution R" in capsys.readouterr().err

    # --output is checked before any work.
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit):
        main(["--raw_pixels", *fm, "--output", str(tmp_path / "taken")])
    assert "is a directory" in capsys.readouterr().err


def test_limits_sample_every_class_of_an_image_folder(tmp_path, capsys, image_dir):
    out = tmp_path / "nested" / "result.json"  # its folder is created
    argv = ["--raw_pixels", "--train_dir", str(image_dir), "--val_dir", str(image_dir)]
    argv += ["--train_limit", "6", "--test_limit", "6", "--nb_knn", "1", "--resolution", "32"]
    assert main([*argv, "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert json.loads(out.read_text()) == [printed]  # the printed lines, as one JSON array
    assert out.read_text().endswith("]\n")
    assert printed["n_train"] == printed["n_test"] == 6

    from training.eval_knn import _sample, image_folder

    _, labels, classes = image_folder(image_dir)
    picked = [labels[i] for i in _sample(len(labels), 6)]
    assert classes == ["cats", "dogs"] and set(picked) == {0, 1}  # not the first class only
    assert _sample(len(labels), 6) == _sample(len(labels), 6)  # fixed seed


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "nan"], "--temperature must be a positive number"),
        (["--temperature", "inf"], "--temperature must be a positive number"),
        (["--resolution", "0"], "--resolution must be in [1, 2048]"),
        (["--resolution", "100000"], "--resolution must be in [1, 2048], got 100000"),
        (["--train_limit", "-1"], "must be >= 0"),
        (["--num_heads", "0"], "--num_heads must be positive"),
    ],
)
def test_out_of_range_options_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        main(["--raw_pixels", "--dataset", "fashion-mnist", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_resolution_below_the_patch_size_is_one_line(tmp_path, monkeypatch, capsys,
                                                        tiny_model_repository):  # fmt: skip
    root = write_fashion_mnist(tmp_path / "fm", n_train=10, n_test=5)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    onnx_path = tiny_model_repository / "tiny" / "1" / "model.onnx"
    assert main(["--onnx", str(onnx_path), "--dataset", "fashion-mnist", "--resolution", "4"]) == 1
    err = capsys.readouterr().err
    assert "smaller than the model's patch size 8" in err and "Traceback" not in err


def test_dashed_spellings_hidden_folders_and_k_beyond_the_train_set(
    tmp_path, capsys, caplog, image_dir
):
    """--train-dir works as --train_dir (as in training.pretrain); a hidden folder such as
    .ipynb_checkpoints is no class; a k above the number of training images says so."""
    val = tmp_path / "val"
    shutil.copytree(image_dir, val)
    (val / ".ipynb_checkpoints").mkdir()
    argv = ["--raw-pixels", "--train-dir", str(image_dir), "--val-dir", str(val)]
    assert main([*argv, "--resolution", "32", "--nb-knn", "1", "500"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["k"], r["k_used"]) for r in lines] == [(1, 1), (500, 18)]
    assert "k=500 is more than the 18 training images" in caplog.text


def test_a_backbone_of_a_custom_width_loads_with_num_heads(tmp_path, monkeypatch, capsys):
    from tests.conftest import make_tiny_vit

    root = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=10)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    path = tmp_path / "backbone.pth"
    torch.save(make_tiny_vit().state_dict(), path)  # width 32: no standard head count
    argv = ["--checkpoint", str(path), "--dataset", "fashion-mnist", "--nb_knn", "5"]
    assert main(argv) == 1
    assert "(--num-heads)" in capsys.readouterr().err  # both spellings work here
    assert main([*argv, "--num_heads", "2"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n_train"] == 20


def _recipe(resolution=224):
    from models.contract import IMAGE_MEAN, IMAGE_STD, PreprocessingRecipe, resize_for_crop

    return PreprocessingRecipe(
        resolution=resolution,
        resize_size=resize_for_crop(resolution),
        interpolation="bicubic",
        mean=IMAGE_MEAN,
        std=IMAGE_STD,
    )


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (257, 256), (1000, 230)])
def test_the_eval_transform_is_torchvisions(size):
    """Resize(256, bicubic), CenterCrop(224), ToTensor, Normalize: the reference's k-NN input."""
    from PIL import Image
    from torchvision import transforms

    from training.eval_knn import preprocess

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    reference = transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )(image)
    np.testing.assert_allclose(preprocess(image, _recipe()), reference.numpy(), atol=1e-6)


def test_an_extreme_strip_is_cropped_before_it_is_resized(monkeypatch):
    """A 40000 x 2 strip would be resized to 5,120,000 x 256 (3.9 GB) before its crop."""
    from PIL import Image

    import training.eval_knn as eval_knn

    rng = np.random.default_rng(1)
    strip = Image.fromarray(rng.integers(0, 256, (2, 40000, 3), dtype=np.uint8))
    resized_sizes = []
    original_resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        resized_sizes.append(tuple(size))
        return original_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    out = eval_knn.resize_and_crop(strip, _recipe())
    assert out.size == (224, 224) and resized_sizes == [(224, 224)]
    # Same sampling positions as the full resize (within Pillow's fixed-point rounding), shown
    # on a strip small enough to resize in full.
    small = Image.fromarray(rng.integers(0, 256, (3, 600, 3), dtype=np.uint8))
    full = np.asarray(eval_knn.resize_and_crop(small, _recipe()), dtype=np.int16)
    monkeypatch.setattr(eval_knn, "EXACT_RESIZE_MAX_PIXELS", 0)
    boxed = np.asarray(eval_knn.resize_and_crop(small, _recipe()), dtype=np.int16)
    assert np.abs(full - boxed).max() <= 2


def test_an_image_reached_from_two_class_folders_keeps_its_own_label(tmp_path, caplog):
    from PIL import Image

    from training.eval_knn import image_folder

    root = tmp_path / "train"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (9, 9, 9)).save(root / name / f"{name}.png")
    (root / "b" / "up").symlink_to(root, target_is_directory=True)  # b/up/a/a.png is a/a.png
    paths, labels, classes = image_folder(root)
    assert classes == ["a", "b"]
    assert sorted((p.name, classes[label]) for p, label in zip(paths, labels, strict=True)) == [
        ("a.png", "a"),
        ("b.png", "b"),
    ]
    assert "reachable from more than one class folder" in caplog.text


def _sized_folder(root, sizes):
    from PIL import Image

    for name, size in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (90, 120, 200)).save(root / name)
    return root


@pytest.mark.parametrize("batch_size", ["1", "128"])
def test_raw_pixels_of_other_sizes_in_other_batches_or_splits_are_one_line(
    tmp_path, capsys, batch_size
):
    # Within one batch the sizes were compared; across batches, or train against val, numpy's
    # or torch's own error (or a traceback) came out instead.
    train = _sized_folder(tmp_path / "train", {"a/1.png": (40, 40), "b/2.png": (40, 40)})
    val = _sized_folder(tmp_path / "val", {"a/3.png": (50, 50), "b/4.png": (50, 50)})
    argv = ["--raw_pixels", "--train_dir", str(train), "--val_dir", str(val), "--nb_knn", "1"]
    assert main([*argv, "--batch_size", batch_size]) == 1
    err = capsys.readouterr().err
    assert "error: the images have different sizes" in err and "Traceback" not in err
    mixed = _sized_folder(tmp_path / "mixed", {"a/1.png": (40, 40), "b/2.png": (50, 50)})
    argv = ["--raw_pixels", "--train_dir", str(mixed), "--val_dir", str(mixed), "--nb_knn", "1"]
    assert main([*argv, "--batch_size", "1"]) == 1
    assert "pass --resolution R" in capsys.readouterr().err


def test_an_output_that_cannot_be_written_fails_before_the_work(tmp_path, capsys, monkeypatch):
    import training.eval_knn as eval_knn

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(eval_knn, "new_temp_file", read_only)
    extracted = []
    monkeypatch.setattr(eval_knn, "extract_features", lambda *a, **k: extracted.append(1))
    with pytest.raises(SystemExit) as info:
        main(["--raw_pixels", "--dataset", "fashion-mnist", "--output", str(tmp_path / "r.json")])
    assert info.value.code == 2 and not extracted
    assert "cannot write there (Permission denied)" in capsys.readouterr().err


def test_a_failed_final_write_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch):
    root = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=6)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    argv = ["--raw_pixels", "--dataset", "fashion-mnist", "--nb_knn", "1"]
    if Path("/dev/full").exists():  # accepts the open, refuses the write: ENOSPC
        assert main([*argv, "--output", "/dev/full"]) == 1
        err = capsys.readouterr().err
        assert "error: cannot write --output /dev/full: No space" in err and "Traceback" not in err

    import training.eval_knn as eval_knn

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_knn, "extract_features", interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_an_onnx_model_off_the_contract_is_named(tmp_path, capsys, tiny_model_repository):
    import onnx

    proto = onnx.load(str(tiny_model_repository / "tiny" / "1" / "model.onnx"))
    for node in proto.graph.node:
        node.output[:] = ["cls" if o == "cls_embedding" else o for o in node.output]
    for output in proto.graph.output:
        if output.name == "cls_embedding":
            output.name = "cls"
    renamed = tmp_path / "renamed.onnx"
    onnx.save(proto, str(renamed))
    assert main(["--onnx", str(renamed), "--dataset", "fashion-mnist"]) == 1
    err = capsys.readouterr().err
    assert "does not follow this project's contract" in err and "'cls_embedding'" in err
    assert "Traceback" not in err


def test_skip_warnings_print_once_on_their_own_line(tmp_path):
    # In a process of its own, as a user runs it (the progress bars are on stderr too).
    import subprocess
    import sys

    train = _sized_folder(tmp_path / "train", {"a/1.png": (32, 32), "b/2.png": (32, 32)})
    (train / "a" / "broken.png").write_bytes(b"")
    argv = ["--raw_pixels", "--train_dir", str(train), "--val_dir", str(train), "--nb_knn", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "training.eval_knn", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.split("\n")
    skipped = [line for line in lines if "skipping unreadable image" in line]
    assert len(skipped) == 2  # once per split: the train and the val pass both read it
    # What shows after the last carriage return: the warning, not a bar with it glued on.
    assert all(line.rsplit("\r", 1)[-1].startswith("WARNING skipping") for line in skipped)


def test_raw_pixels_with_the_same_count_but_other_shapes_are_refused(tmp_path, capsys):
    # 16 x 16 and 32 x 8 images have as many pixels: flattened first, they compared "equal".
    train = _sized_folder(tmp_path / "train", {"a/1.png": (16, 16), "b/2.png": (16, 16)})
    val = _sized_folder(tmp_path / "val", {"a/3.png": (32, 8), "b/4.png": (8, 32)})
    argv = ["--raw_pixels", "--train_dir", str(train), "--val_dir", str(val), "--nb_knn", "1"]
    assert main(argv) == 1
    assert "error: the images have different sizes" in capsys.readouterr().err
    # Within one split: 32 x 8 and 8 x 32 in one batch.
    assert main(["--raw_pixels", "--train_dir", str(val), "--val_dir", str(val)]) == 1
    assert "error: the images have different sizes" in capsys.readouterr().err


def test_an_existing_output_file_needs_no_new_file_in_its_folder(tmp_path, capsys, monkeypatch):
    import training.eval_knn as eval_knn

    root = write_fashion_mnist(tmp_path / "fm", n_train=20, n_test=6)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    out = tmp_path / "results.json"
    out.write_text("[]")

    def no_new_files(*args, **kwargs):  # a folder where files cannot be created
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(eval_knn, "new_temp_file", no_new_files)
    link = tmp_path / "link.json"
    link.symlink_to(out)
    argv = ["--raw_pixels", "--dataset", "fashion-mnist", "--nb_knn", "1", "--output", str(link)]
    assert main(argv) == 0
    assert json.loads(out.read_text())[0]["k"] == 1  # written through the link


def test_in_process_callers_keep_their_logging(tmp_path, capsys, monkeypatch):
    # A host program (here pytest) has set up logging: the skip warnings go to its handlers,
    # not to an extra stderr handler of the progress-bar redirect.
    import logging

    # (an earlier in-process pretrain run leaves its own stderr handler on "training")
    monkeypatch.setattr(logging.getLogger("training"), "handlers", [])
    train = _sized_folder(tmp_path / "train", {"a/1.png": (32, 32), "b/2.png": (32, 32)})
    (train / "a" / "broken.png").write_bytes(b"")
    argv = ["--raw_pixels", "--train_dir", str(train), "--val_dir", str(train), "--nb_knn", "1"]
    assert main(argv) == 0
    assert "skipping unreadable image" not in capsys.readouterr().err


def test_an_output_that_is_an_input_is_refused_before_the_work(
    tmp_path, capsys, monkeypatch, image_dir
):
    # --output ck.pth replaced the checkpoint with the JSON results, with exit status 0.
    import training.eval_knn as eval_knn

    extracted = []
    monkeypatch.setattr(eval_knn, "extract_features", lambda *a, **k: extracted.append(1))
    root = write_fashion_mnist(tmp_path / "fm", n_train=10, n_test=5)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    model = tmp_path / "ck.pth"
    model.write_bytes(b"the model")
    (tmp_path / "link.json").symlink_to(model)
    fm = ["--dataset", "fashion-mnist"]
    image = next((image_dir / "cats").glob("*.png"))
    cases = [
        (["--checkpoint", str(model), *fm], model, f"the --checkpoint {model}"),
        (["--checkpoint", str(model), *fm], tmp_path / "link.json", f"the --checkpoint {model}"),
        (["--onnx", str(model), *fm], tmp_path / "." / "ck.pth", f"the --onnx model {model}"),
        (["--raw_pixels", *fm], root / "t10k-labels-idx1-ubyte.gz", "the Fashion-MNIST file"),
        (
            ["--raw_pixels", "--train_dir", str(image_dir), "--val_dir", str(tmp_path / "v")],
            image,
            f"an image of --train_dir {image_dir}",
        ),
    ]
    for argv, output, what in cases:
        before = output.read_bytes()
        with pytest.raises(SystemExit) as info:
            main([*argv, "--output", str(output)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"--output {output} would overwrite {what}" in err
        assert output.read_bytes() == before
    assert not extracted
    assert model.read_bytes() == b"the model"


def test_non_finite_features_are_refused_not_scored(tmp_path, monkeypatch, capsys):
    # NaN weights gave NaN features, which normalised still "voted": top1 50.0, exit status 0.
    from tests.conftest import make_tiny_vit
    from training.data import DataError
    from training.eval_knn import extract_features

    root = write_fashion_mnist(tmp_path / "fm", n_train=10, n_test=5)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    model = make_tiny_vit()
    with torch.no_grad():
        model.norm.weight.fill_(float("nan"))
    path = tmp_path / "nan.pth"
    torch.save(model.state_dict(), path)
    argv = ["--checkpoint", str(path), "--num_heads", "2", "--dataset", "fashion-mnist"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert f"error: the checkpoint {path} gives features that are not finite" in captured.err
    # The ONNX and raw-pixel paths go through the same check.
    from PIL import Image

    images = [lambda: Image.new("RGB", (8, 8))] * 3
    with pytest.raises(DataError, match="the ONNX model m.onnx gives features that are not fin"):
        extract_features(
            images, lambda b: np.full((len(b), 4), np.inf, np.float32), _recipe(8), 2, "test",
            source="the ONNX model m.onnx",
        )  # fmt: skip


def test_pipes_are_outputs(tmp_path):
    # /dev/stdout (a pipe) and >(cat > f) were refused: resolve() made them "pipe:[123]".
    import os
    import subprocess
    import sys

    root = write_fashion_mnist(tmp_path / "fm", n_train=10, n_test=5)
    env = {**os.environ, "DINO_FASHION_MNIST_ROOT": str(root)}
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "training.eval_knn", "--raw_pixels", "--dataset"]
    argv += ["fashion-mnist", "--nb_knn", "1"]
    with subprocess.Popen(
        [*argv, "--output", f"/dev/fd/{write_end}"], env=env, pass_fds=(write_end,),
        stderr=subprocess.PIPE, text=True,
    ) as child:  # fmt: skip
        os.close(write_end)
        with os.fdopen(read_end) as reader:
            written = reader.read()
        assert child.wait(timeout=120) == 0, child.stderr.read() if child.stderr else ""
    assert json.loads(written)[0]["k"] == 1
    result = subprocess.run(
        [*argv, "--output", "/dev/stdout"], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    line, array = result.stdout.split("\n", 1)
    assert json.loads(array) == [json.loads(line)]
    # Standard output redirected to a file, named as /dev/stdout or by its name: the lines
    # printed before were truncated away when the output was opened anew.
    log = tmp_path / "log.txt"
    for output in ("/dev/stdout", str(log)):
        with open(log, "w") as stdout:
            subprocess.run(
                [*argv, "--output", output], env=env, stdout=stdout, timeout=120, check=True
            )
        line, array = log.read_text().split("\n", 1)
        assert json.loads(array) == [json.loads(line)]


def test_an_onnx_model_with_a_fixed_batch_size_is_refused_up_front(
    tmp_path, capsys, monkeypatch, tiny_model_repository
):
    # A shape-fixing tool's output (batch 1, metadata kept) failed in onnxruntime mid-run.
    import onnx

    root = write_fashion_mnist(tmp_path / "fm", n_train=10, n_test=5)
    monkeypatch.setenv("DINO_FASHION_MNIST_ROOT", str(root))
    proto = onnx.load(str(tiny_model_repository / "tiny" / "1" / "model.onnx"))
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    assert main(["--onnx", str(fixed), "--dataset", "fashion-mnist", "--batch_size", "4"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: --onnx {fixed}: its input pixel_values has the shape [1, 3, height, width], "
        "with a fixed batch 1; the contract's is [batch, 3, height, width] with batch, height, "
        "width dynamic"
    )
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_a_num_heads_that_contradicts_the_checkpoint_is_refused(tmp_path, capsys, image_dir):
    # --num_heads 4 silently rebuilt a model recorded with 2 heads as another model.
    from tests.conftest import make_tiny_vit

    path = tmp_path / "ck.pth"  # this project's layout: the config is recorded
    teacher = {f"backbone.{k}": v for k, v in make_tiny_vit().state_dict().items()}
    torch.save({"teacher": teacher, "vit_config": {"num_heads": 2}}, path)
    argv = ["--checkpoint", str(path), "--train_dir", str(image_dir), "--val_dir", str(image_dir)]
    assert main([*argv, "--num_heads", "4"]) == 1
    assert capsys.readouterr().err == (
        "error: --num-heads 4 contradicts the checkpoint, which records 2 heads "
        "(vit_config.num_heads): drop --num-heads\n"
    )
    assert main([*argv, "--num_heads", "2", "--nb_knn", "1"]) == 0
