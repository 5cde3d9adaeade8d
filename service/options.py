"""Parsing and validation of ``/embed`` options (form fields or query parameters)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

from models.contract import ATTENTION_MAPS, CLS_EMBEDDING, OUTPUT_NAMES, PATCH_FEATURES
from service.errors import InvalidOptionError
from service.preprocess import Crop, round_to_patch

Encoding = Literal["json", "base64"]
DType = Literal["float32", "float16"]

OUTPUT_ALIASES: dict[str, str] = {
    "cls": CLS_EMBEDDING.name,
    "patch": PATCH_FEATURES.name,
    "attention": ATTENTION_MAPS.name,
    CLS_EMBEDDING.name: CLS_EMBEDDING.name,
    PATCH_FEATURES.name: PATCH_FEATURES.name,
    ATTENTION_MAPS.name: ATTENTION_MAPS.name,
}
OPTION_NAMES: tuple[str, ...] = ("outputs", "normalize", "resolution", "crop", "encoding", "dtype")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# ASCII digits only (no sign, '_', or other scripts), leading zeros allowed, at most 9 others.
_DIGITS = re.compile(r"0*[0-9]{1,9}")
_SHOWN_CHARS = 40
"""Most characters of a client's value repeated in an error message."""


@dataclass(frozen=True)
class EmbedOptions:
    """Validated options of one request.

    Attributes:
        outputs: Contract output names, in contract order.
        normalize: L2-normalise the CLS embedding.
        resolution: Requested resolution (None: the model's default), not yet rounded.
        crop: ``center`` or ``none``.
        encoding: ``json`` or ``base64``.
        dtype: ``float32`` or ``float16``.
    """

    outputs: tuple[str, ...] = (CLS_EMBEDDING.name,)
    normalize: bool = False
    resolution: int | None = None
    crop: Crop = "center"
    encoding: Encoding = "json"
    dtype: DType = "float32"


def parse_options(raw: dict[str, list[str]]) -> EmbedOptions:
    """Validate raw option values.

    Names are case-sensitive; values are not (``crop=Center``, ``outputs=CLS`` and
    ``dtype=FLOAT16`` are accepted). Surrounding whitespace is ignored.

    Args:
        raw: Option name -> values, merged from the query string and the form.

    Raises:
        InvalidOptionError: Unknown name, repeated scalar option, or invalid value.
    """
    unknown = sorted(set(raw) - set(OPTION_NAMES))
    if unknown:
        raise InvalidOptionError(
            f"unknown option(s) {', '.join(map(_shown, unknown[:10]))}"
            f"{' and more' if len(unknown) > 10 else ''}; "
            f"valid options are {', '.join(OPTION_NAMES)} (and the file field 'images')"
        )
    for name, values in raw.items():
        if name != "outputs" and len(values) > 1:
            raise InvalidOptionError(f"option {name!r} was given {len(values)} times; give it once")
    single = {name: values[0].strip() for name, values in raw.items() if name != "outputs"}
    return EmbedOptions(
        outputs=_parse_outputs(raw.get("outputs", [])),
        normalize=_parse_bool(single.get("normalize", "false")),
        resolution=_parse_resolution(single.get("resolution", "")),
        crop=cast(Crop, _choice("crop", single.get("crop", "center"), ("center", "none"))),
        encoding=cast(
            Encoding, _choice("encoding", single.get("encoding", "json"), ("json", "base64"))
        ),
        dtype=cast(DType, _choice("dtype", single.get("dtype", "float32"), ("float32", "float16"))),
    )


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    lowered = value.lower()
    if lowered not in allowed:
        raise InvalidOptionError(f"{name}={_shown(value)} is not one of {', '.join(allowed)}")
    return lowered


def _parse_outputs(values: list[str]) -> tuple[str, ...]:
    if not values:
        return (CLS_EMBEDDING.name,)
    wanted = set()
    for value in values:
        for part in value.split(","):
            token = part.strip().lower()
            if token not in OUTPUT_ALIASES:
                raise InvalidOptionError(
                    f"outputs={_shown(token)} is not one of cls, patch, attention"
                    f" (or {', '.join(OUTPUT_NAMES)})"
                )
            wanted.add(OUTPUT_ALIASES[token])
    return tuple(name for name in OUTPUT_NAMES if name in wanted)


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidOptionError(f"normalize={_shown(value)} is not a boolean (true/false)")


def _parse_resolution(value: str) -> int | None:
    if value == "":
        return None
    if _DIGITS.fullmatch(value) is None:
        if value.isascii() and value.isdigit():  # more than nine digits
            raise InvalidOptionError(f"resolution={value[:20]}... is far outside the limits")
        raise InvalidOptionError(
            f"resolution={_shown(value)} is not a positive integer written in ASCII digits"
        )
    return int(value)


def _shown(value: str) -> str:
    """``value`` quoted for an error message, cut to :data:`_SHOWN_CHARS` characters."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"


def max_side(max_resolution: int, default: int) -> int:
    """Largest processed side: ``DINO_MAX_RESOLUTION``, but never below the model's default.

    A model is always served at its own resolution; a setting below it is raised to it, so a
    plain request, ``resolution`` equal to the default and ``crop=none`` agree.

    Args:
        max_resolution: The ``DINO_MAX_RESOLUTION`` setting.
        default: The model's default resolution (from its metadata).
    """
    return max(max_resolution, default)


def resolve_resolution(
    requested: int | None, *, default: int, patch_size: int, max_resolution: int
) -> int:
    """The resolution to use: the model's default, or the request rounded to a patch multiple.

    Args:
        requested: The ``resolution`` option, None when absent.
        default: The model's default resolution, always allowed.
        patch_size: The model's patch size.
        max_resolution: The ``DINO_MAX_RESOLUTION`` setting (see :func:`max_side`).

    Raises:
        InvalidOptionError: Outside ``[patch_size, max_side(max_resolution, default)]`` after
            rounding.
    """
    if requested is None:
        return default
    limit = max(patch_size, (max_side(max_resolution, default) // patch_size) * patch_size)
    rounded = round_to_patch(min(max(requested, 0), 2 * limit), patch_size)
    if requested < 1 or rounded > limit:
        raise InvalidOptionError(
            f"resolution={requested} is outside the limits: it must round to a multiple of "
            f"the patch size {patch_size} between {patch_size} and {limit}"
        )
    return rounded
