"""The seed's main.py: one parser for three modes, so a flag of another mode is named, not lost."""

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
