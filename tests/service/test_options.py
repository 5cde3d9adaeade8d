"""Option parsing and resolution rounding."""

from __future__ import annotations

import pytest

from service.errors import InvalidOptionError
from service.options import EmbedOptions, max_side, parse_options, resolve_resolution


def test_defaults() -> None:
    assert parse_options({}) == EmbedOptions()
    assert EmbedOptions().outputs == ("cls_embedding",)


def test_every_option() -> None:
    options = parse_options(
        {
            "outputs": ["attention, cls", "patch_features"],
            "normalize": ["Yes"],
            "resolution": [" 100 "],
            "crop": ["none"],
            "encoding": ["base64"],
            "dtype": ["float16"],
        }
    )
    assert options == EmbedOptions(
        outputs=("cls_embedding", "patch_features", "attention_maps"),
        normalize=True,
        resolution=100,
        crop="none",
        encoding="base64",
        dtype="float16",
    )


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"size": ["1"]}, "unknown option"),
        ({"crop": ["none", "center"]}, "given 2 times"),
        ({"outputs": [""]}, "outputs=''"),
        ({"normalize": ["2"]}, "normalize='2'"),
        ({"resolution": ["1.5"]}, "resolution='1.5'"),
        ({"encoding": ["msgpack"]}, "encoding='msgpack'"),
        ({"resolution": ["3_2"]}, "ASCII digits"),
        ({"resolution": ["\u0663\u0662"]}, "ASCII digits"),  # Arabic-Indic "32"
        ({"resolution": ["+32"]}, "ASCII digits"),
        ({"resolution": ["-32"]}, "ASCII digits"),
        ({"resolution": ["\u00b2"]}, "ASCII digits"),  # superscript two
        ({"resolution": ["9" * 400]}, "outside the limits"),
    ],
)
def test_errors_name_the_bad_value(raw: dict[str, list[str]], fragment: str) -> None:
    with pytest.raises(InvalidOptionError, match=fragment):
        parse_options(raw)


@pytest.mark.parametrize(
    "raw",
    [
        {"crop": ["x" * 60_000]},
        {"outputs": ["cls," + "y" * 60_000]},
        {"normalize": ["z" * 60_000]},
        {"resolution": ["1." + "5" * 60_000]},
        {"w" * 60_000: ["1"]},
        {f"name{i}" * 100: ["1"] for i in range(50)},  # many long unknown names
    ],
)
def test_errors_repeat_at_most_a_short_prefix_of_a_long_value(raw: dict[str, list[str]]) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        parse_options(raw)
    message = str(caught.value)
    assert len(message) < 1_000, message[:300]
    assert "characters)" in message or "and more" in message  # says that it was cut


def test_resolution_rounding_and_limits() -> None:
    assert resolve_resolution(None, default=224, patch_size=16, max_resolution=1024) == 224
    assert resolve_resolution(230, default=224, patch_size=16, max_resolution=1024) == 224
    assert resolve_resolution(1, default=224, patch_size=16, max_resolution=1024) == 16
    assert resolve_resolution(1030, default=224, patch_size=16, max_resolution=1024) == 1024
    for bad in (0, -5, 1041, 10**9):
        with pytest.raises(InvalidOptionError, match="limits"):
            resolve_resolution(bad, default=224, patch_size=16, max_resolution=1024)


def test_the_models_default_resolution_is_always_allowed() -> None:
    # DINO_MAX_RESOLUTION below the model's default: the limit is raised to the default, so
    # asking for the default explicitly gives what a plain request gives.
    assert resolve_resolution(None, default=32, patch_size=8, max_resolution=16) == 32
    assert resolve_resolution(32, default=32, patch_size=8, max_resolution=16) == 32
    assert resolve_resolution(22, default=32, patch_size=8, max_resolution=16) == 24
    with pytest.raises(InvalidOptionError, match="between 8 and 32"):
        resolve_resolution(40, default=32, patch_size=8, max_resolution=16)
    assert max_side(16, 32) == 32 and max_side(1024, 224) == 1024


def test_values_are_case_insensitive() -> None:
    options = parse_options(
        {
            "outputs": ["CLS, Patch_Features"],
            "normalize": ["TRUE"],
            "crop": ["None"],
            "encoding": ["BASE64"],
            "dtype": ["Float16"],
        }
    )
    assert options == EmbedOptions(
        outputs=("cls_embedding", "patch_features"),
        normalize=True,
        crop="none",
        encoding="base64",
        dtype="float16",
    )


def test_huge_resolution_never_overflows() -> None:
    for requested in (10**400, 2**1100, 10**9):
        with pytest.raises(InvalidOptionError, match="limits"):
            resolve_resolution(requested, default=224, patch_size=16, max_resolution=1024)


def test_resolution_may_have_leading_zeros_but_not_many_digits() -> None:
    assert parse_options({"resolution": ["0000000064"]}).resolution == 64
    assert parse_options({"resolution": ["0224"]}).resolution == 224
    with pytest.raises(InvalidOptionError, match="far outside the limits"):
        parse_options({"resolution": ["1" + "0" * 12]})
