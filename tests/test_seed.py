"""The seed's main.py: one parser for three modes, and messages that name the seed's own flags."""

from faceattr.cli import parse
from faceattr.seed import build_parser, unused_flags


def unused(*argv: str) -> list[str]:
    return unused_flags(parse(build_parser, list(argv)))


def test_flags_of_another_mode_are_named_as_given():
    assert unused("--mode=train", "--epochs=3", "--batch_size=64", "--save_dir=r") == []
    assert unused("--mode=test", "--batch_size=64", "--vote=majority", "--save_dir=r") == []
    assert unused("--mode=test", "--epochs=3", "--weight-decay=0", "--resume") == [
        "--epochs", "--weight-decay", "--resume"
    ]  # fmt: skip
    assert unused("--mode=train", "--img_test_dir=v", "--no-tta", "--model_dir=m") == [
        "--img_test_dir", "--model_dir", "--no-tta"
    ]  # fmt: skip
    assert unused("--mode=explore", "--img_test_dir=v", "--out=e", "--batch_size=8") == [
        "--batch_size"
    ]
    assert unused("--mode=explore", "--workers=1", "--no-cache", "-q", "--device=cpu") == []


def test_train_errors_name_save_dir_the_seeds_flag(dataset_dir):
    from conftest import assert_user_error, here

    inside = dataset_dir / "train_img" / "run"
    result = here("--mode=train", f"--img_train_dir={dataset_dir / 'train_img'}",
                  f"--labels_txt={dataset_dir / 'label_train.txt'}", f"--save_dir={inside}",
                  seed=True)  # fmt: skip
    assert_user_error(
        result, f"--save_dir {inside} is inside the image folder", "another --save_dir"
    )
    assert "--out" not in result.stderr and not inside.exists()
