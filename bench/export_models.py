"""Export time, file size and parity of the official architectures (random weights).

    python bench/export_models.py                  # vit_small/16, vit_small/8, vit_base/16
    python bench/export_models.py --arch vit_small --patch 16

Prints one JSON line per (architecture, precision): seconds (parity check included), MB,
the worst max abs error against PyTorch per output at 224x224 and 320x256 (or the model's
two parity sizes), and the minimum CLS cosine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from models.contract import OUTPUT_NAMES
from models.export import export_model
from models.vit import VisionTransformer, count_parameters, vit_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default=None, help="one architecture (default: three)")
    parser.add_argument("--patch", type=int, default=16)
    args = parser.parse_args()
    targets = (
        [(args.arch, args.patch)]
        if args.arch
        else [("vit_small", 16), ("vit_small", 8), ("vit_base", 16)]
    )
    with tempfile.TemporaryDirectory() as folder:
        for arch, patch in targets:
            torch.manual_seed(0)
            model = VisionTransformer(vit_config(arch, patch))
            for precision in ("float32", "float16"):
                report = export_model(
                    model,
                    Path(folder) / f"{arch}{patch}_{precision}.onnx",
                    resolution=224,
                    precision=precision,
                    weights_sha256="0" * 64,
                    source="bench/export_models.py",
                )
                worst = {
                    f"{name}_max_abs": max(row[f"{name}_max_abs"] for row in report.parity)
                    for name in OUTPUT_NAMES
                }
                cosine = min(row["cls_embedding_min_cosine"] for row in report.parity)
                print(
                    json.dumps(
                        {
                            "arch": arch,
                            "patch": patch,
                            "parameters": count_parameters(model),
                            "precision": precision,
                            "seconds": round(report.seconds, 2),
                            "megabytes": round(report.size_bytes / 1e6, 1),
                            **{k: float(f"{v:.3g}") for k, v in worst.items()},
                            "cls_min_cosine": round(cosine, 8),
                            "threads": torch.get_num_threads(),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
