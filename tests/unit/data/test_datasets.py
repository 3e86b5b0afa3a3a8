"""MVTec-layout, VisA and folder datasets on hand-made trees; bad files with skip_bad and collate_samples."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from invert_ad.data import (
    FolderDataset,
    ImageReadError,
    MVTecDataset,
    VisADataset,
    collate_samples,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _image(path: Path, size=(30, 20), mode="RGB") -> Path:
    """A (H, W) = size image: left half red, right half blue (gray: 0 / 255 halves)."""
    height, width = size
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[:, : width // 2] = RED
    rgb[:, width // 2 :] = BLUE
    image = Image.fromarray(rgb)
    if mode == "L":
        image = Image.fromarray(np.where(rgb[..., 0:1] > 0, 0, 255).astype(np.uint8)[..., 0], "L")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _mask(path: Path, size=(30, 20)) -> Path:
    """Anomalous top half, values 255."""
    mask = np.zeros(size, dtype=np.uint8)
    mask[: size[0] // 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


@pytest.fixture
def mvtec(tmp_path) -> Path:
    root = tmp_path / "bottle"
    for i in range(3):
        _image(root / "train" / "good" / f"{i:03d}.png", size=(30 + i, 20))
    _image(root / "validation" / "good" / "000.png")
    _image(root / "test" / "good" / "000.png")
    for i in range(2):
        _image(root / "test" / "crack" / f"{i:03d}.png", size=(40, 24))
        _mask(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", size=(40, 24))
    _image(root / "test" / "scratch" / "000.jpg")
    _mask(root / "ground_truth" / "scratch" / "000_mask.png")
    return root


def test_mvtec_train_split(mvtec):
    dataset = MVTecDataset(mvtec, "train", image_size=16)
    assert len(dataset) == 3 and dataset.labels == [0, 0, 0] and not dataset.problems
    sample = dataset[2]
    assert sample["image"].shape == (3, 16, 16) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (1, 16, 16) and not sample["mask"].any()
    assert sample["label"] == 0 and sample["defect_type"] == "good" and sample["index"] == 2
    assert sample["path"].endswith("train/good/002.png")
    assert sample["original_size"].tolist() == [32, 20]
    # orientation kept: left red, right blue
    assert torch.allclose(sample["image"][:, 8, 0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(sample["image"][:, 8, -1], torch.tensor([0, 0, 1.0]))


def test_mvtec_test_split_with_masks(mvtec):
    dataset = MVTecDataset(mvtec, "test", image_size=8)
    assert [Path(p).relative_to(mvtec).as_posix() for p in dataset.paths] == [
        "test/crack/000.png",
        "test/crack/001.png",
        "test/good/000.png",
        "test/scratch/000.jpg",
    ]
    assert dataset.labels == [1, 1, 0, 1]
    sample = dataset[1]
    assert sample["defect_type"] == "crack" and sample["original_size"].tolist() == [40, 24]
    expected = torch.zeros(1, 8, 8)
    expected[:, :4] = 1
    torch.testing.assert_close(sample["mask"], expected)
    assert not dataset[2]["mask"].any()
    assert len(MVTecDataset(mvtec, "validation")) == 1


def test_mvtec_missing_train_good_names_the_folder(tmp_path):
    (tmp_path / "cat" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cat/train/good"):
        MVTecDataset(tmp_path / "cat", "train")
    with pytest.raises(FileNotFoundError, match=r"cat/validation/good"):
        MVTecDataset(tmp_path / "cat", "validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MVTecDataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="split"):
        MVTecDataset(tmp_path / "cat", "val")


def test_mvtec_problems_are_reported_not_raised(mvtec):
    (mvtec / "ground_truth" / "crack" / "001_mask.png").unlink()
    _mask(mvtec / "ground_truth" / "crack" / "007_mask.png")
    _mask(mvtec / "ground_truth" / "hole" / "000_mask.png")
    (mvtec / "test" / "good" / "001.png").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"4 problem\(s\): 1 empty_file, 1 mask_missing, 2 mask_without_image"):
        dataset = MVTecDataset(mvtec, "test")
    kinds = {(p.kind, Path(p.path).name) for p in dataset.problems}
    assert kinds == {
        ("mask_missing", "001.png"),
        ("mask_without_image", "007_mask.png"),
        ("mask_without_image", "000_mask.png"),
        ("empty_file", "001.png"),
    }
    assert len(dataset) == 4  # the empty file is left out; the image without a mask stays, with a zero mask
    crack_1 = dataset.paths.index(str(mvtec / "test" / "crack" / "001.png"))
    assert dataset[crack_1]["label"] == 1 and not dataset[crack_1]["mask"].any()


def test_unreadable_entries_are_reported_and_left_out(mvtec, tmp_path):
    (mvtec / "train" / "good" / "099.png").symlink_to(tmp_path / "gone.png")  # dangling
    loop = mvtec / "test" / "crack" / "098.png"
    loop.symlink_to(loop)
    with pytest.warns(UserWarning, match=r"1 problem\(s\): 1 unreadable_entry"):
        train = MVTecDataset(mvtec, "train")
    with pytest.warns(UserWarning, match=r"unreadable_entry"):
        test = MVTecDataset(mvtec, "test")
    assert [p.path for p in train.problems] == [f"{mvtec / 'train' / 'good' / '099.png'} (dangling symbolic link)"]
    assert ("unreadable_entry", f"{loop} (symbolic link loop)") in {(p.kind, p.path) for p in test.problems}
    assert not any("099" in path or "098" in path for path in train.paths + test.paths)
    with pytest.warns(UserWarning, match="unreadable_entry"):
        folder = FolderDataset(mvtec / "train" / "good")
    assert len(folder) == len(train)


def test_mvtec3d_and_btad_layouts(tmp_path):
    tire = tmp_path / "tire"
    _image(tire / "train" / "good" / "rgb" / "000.png")
    _image(tire / "test" / "cut" / "rgb" / "000.png")
    _mask(tire / "test" / "cut" / "gt" / "000.png")
    _image(tire / "test" / "good" / "rgb" / "000.png")
    _mask(tire / "test" / "good" / "gt" / "000.png")  # MVTec 3D-AD ships all-zero gt for good images
    assert len(MVTecDataset(tire, "train")) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test = MVTecDataset(tire, "test", image_size=8)
    assert test.labels == [1, 0] and test[0]["mask"].sum() == 32

    btad = tmp_path / "01"
    _image(btad / "train" / "ok" / "0000.bmp")
    _image(btad / "test" / "ko" / "0000.bmp")
    _mask(btad / "ground_truth" / "ko" / "0000.png")
    _image(btad / "test" / "ok" / "0001.bmp")
    test = MVTecDataset(btad, "test", image_size=8)
    assert test.labels == [1, 0] and [s["defect_type"] for s in test] == ["ko", "good"]
    assert test[0]["mask"].sum() == 32 and len(MVTecDataset(btad)) == 1


def test_gray_jpg_becomes_three_equal_channels(tmp_path):
    _image(tmp_path / "n" / "a.jpg", mode="L")
    image = FolderDataset(tmp_path / "n", image_size=8)[0]["image"]
    assert image.shape == (3, 8, 8)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_folder_dataset(tmp_path):
    for i in range(2):
        _image(tmp_path / "normal" / f"n{i}.png")
    _image(tmp_path / "test_normal" / "t0.png")
    _image(tmp_path / "defects" / "d0.png")
    _image(tmp_path / "defects" / "d1.png")
    _mask(tmp_path / "masks" / "d0_mask.png")
    _mask(tmp_path / "masks" / "zz.png")
    train = FolderDataset(tmp_path / "normal")
    assert len(train) == 2 and train.labels == [0, 0]
    with pytest.warns(UserWarning, match="2 problem"):
        test = FolderDataset(
            tmp_path / "normal", tmp_path / "defects", tmp_path / "masks", tmp_path / "test_normal", split="test"
        )
    assert test.labels == [0, 1, 1] and [s["defect_type"] for s in test] == ["good", "defects", "defects"]
    assert test[1]["mask"].any() and not test[2]["mask"].any()
    assert {p.kind for p in test.problems} == {"mask_missing", "mask_without_image"}
    with pytest.raises(ValueError, match="test_normal_dir and/or abnormal_dir"):
        FolderDataset(tmp_path / "normal", split="test")
    with pytest.raises(FileNotFoundError, match=r"normal folder .*nowhere"):
        FolderDataset(tmp_path / "nowhere")


def _visa(tmp_path: Path) -> Path:
    root = tmp_path / "VisA"
    _image(root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    _image(root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG")
    _image(root / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG")
    _mask(root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/404.JPG,candle/Data/Masks/Anomaly/404.png\n"
        "pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,\n"
    )
    return root


def test_visa_reads_its_split_csv(tmp_path):
    root = _visa(tmp_path)
    assert VisADataset(root, "candle", "train").labels == [0]
    with pytest.warns(UserWarning, match="image_missing"):
        test = VisADataset(root, "candle", "test", image_size=8)
    assert test.labels == [0, 1] and [s["defect_type"] for s in test] == ["good", "anomaly"]
    assert test[1]["mask"].sum() == 32 and not test[0]["mask"].any()
    with pytest.raises(ValueError, match=r"present: \[\('candle', 'test'\)"):
        VisADataset(root, "capsules", "train")
    with pytest.raises(FileNotFoundError, match=r"1cls\.csv"):
        VisADataset(tmp_path, "candle")


@pytest.fixture
def with_bad_file(tmp_path) -> Path:
    folder = tmp_path / "normal"
    for i in range(4):
        _image(folder / f"{i}.png")
    data = (folder / "2.png").read_bytes()
    (folder / "2.png").write_bytes(data[: len(data) // 2])
    return folder


def test_bad_file_raises_by_default(with_bad_file):
    dataset = FolderDataset(with_bad_file, image_size=8)
    with pytest.raises(ImageReadError, match=r"2\.png"):
        dataset[2]


def test_skip_bad_lets_a_dataloader_finish(with_bad_file):
    dataset = FolderDataset(with_bad_file, image_size=8, skip_bad=True)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_samples)
    with pytest.warns(UserWarning, match=r"skipping: cannot read image .*2\.png"):
        batches = list(loader)
    assert [len(b["path"]) for b in batches] == [2, 1]
    assert batches[1]["skipped"] == [str(with_bad_file / "2.png")] and batches[0]["skipped"] == []
    assert batches[1]["image"].shape == (1, 3, 8, 8) and batches[1]["index"].tolist() == [3]


def test_collate_of_only_bad_samples_is_empty(with_bad_file):
    dataset = FolderDataset(with_bad_file, image_size=8, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping"):
        batch = collate_samples([dataset[2]])
    assert batch["image"].shape == (0, 3, 8, 8) and batch["path"] == [] and len(batch["skipped"]) == 1


def test_a_dataset_root_stands_for_its_categories(tmp_path):
    from invert_ad.data import category_folders

    for name in ("bottle", "cable"):
        (tmp_path / "root" / name / "train" / "good").mkdir(parents=True)
    (tmp_path / "root" / "license_files").mkdir()
    (tmp_path / "root" / ".cache" / "train").mkdir(parents=True)
    root = tmp_path / "root"
    assert category_folders(root) == [root / "bottle", root / "cable"]
    assert category_folders(root / "bottle") == [root / "bottle"]  # a category is itself
    plain = tmp_path / "plain"
    plain.mkdir()
    assert category_folders(plain) == [plain]  # a folder of normal images is itself
