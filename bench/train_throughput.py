"""Training-step and data-pipeline throughput of DINO pretraining (prints JSON lines).

(a) "reference": the original implementation's step emulated on the same networks: explicit
    softmax attention, the original's position-embedding resize (F.interpolate), fp16 autocast
    + GradScaler, for-loop AdamW, per-tensor clipping with a host sync per tensor, the pairwise
    loss loop and a per-parameter Python EMA loop.
(b) "optimised_<variant>" for each of --variants (bf16, fp16, compile, ...): our step: fused
    attention, bf16 autocast (fp16 + GradScaler for the fp16 variant), fused AdamW, clipping in
    a few batched kernels, foreach EMA, the factored loss, cached position-embedding matrices;
    the compile variants add torch.compile of the backbones. Each is timed against the one
    reference run of the same process.
All run the same math on synthetic crops already on the device. Then the multi-crop
augmentation, for 2x224 + 10x96 crops and for a Fashion-MNIST-like setting (28x28 images,
2x32 + 6x16 crops): the CPU path's images/s per core (PIL, one thread; the default setting from
500x375 photos), the per-core cost of what the loader does for the device-side path (cutting the
crops, or a canvas), and the device-side path's images/s (``training.gpu_augment``, on the GPU,
or on every CPU thread without CUDA): "photometric" on crops the loader cut (the default for
image folders) and "whole" on 256x256 canvases or 28x28 images. No network needed.

    python bench/train_throughput.py            # CUDA defaults: ViT-S/16, 2x224 + 10x96, batch 64
    python bench/train_throughput.py --variants bf16,compile
    python bench/train_throughput.py --tiny     # seconds on a CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from models.layers import Attention
from models.vit import VisionTransformer, vit_config
from training.augment import DataAugmentationDINO, MultiCropGeometry
from training.data import canvas_transform
from training.ema import ParameterEMA
from training.gpu_augment import BatchedMultiCrop
from training.heads import DINOHead
from training.loss import DINOLoss
from training.multicrop import MultiCropWrapper
from training.optim import cancel_gradients_last_layer, clip_gradients, get_params_groups

# Optimised-step variants: name -> (precision, torch.compile mode or None).
VARIANTS: dict[str, tuple[str, str | None]] = {
    "bf16": ("bf16", None),
    "fp16": ("fp16", None),
    "compile": ("bf16", "default"),  # what training.pretrain --compile does
    "compile-reduce-overhead": ("bf16", "reduce-overhead"),  # plus CUDA graphs
    "compile-max-autotune": ("bf16", "max-autotune-no-cudagraphs"),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model and crops, CPU-friendly")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out_dim", type=int, default=65536)
    p.add_argument("--global_size", type=int, default=224)
    p.add_argument("--local_size", type=int, default=96)
    p.add_argument("--local_crops", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--variants",
        default="bf16",
        help="comma-separated optimised steps to time against the one reference step: "
        f"{', '.join(VARIANTS)}",
    )
    p.add_argument("--aug_images", type=int, default=40, help="images for the CPU pipeline bench")
    p.add_argument("--aug_batch", type=int, default=64, help="batch of the batched augmentation")
    p.add_argument("--aug_steps", type=int, default=20, help="timed batches of it")
    args = p.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        p.error(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.tiny:  # small defaults; a flag given on the command line still wins
        tiny = {
            "arch": "tiny", "patch_size": 8, "batch": 8, "out_dim": 1024, "global_size": 32,
            "local_size": 16, "local_crops": 4, "steps": 5, "warmup": 1, "aug_images": 4,
            "aug_batch": 4, "aug_steps": 2,
        }  # fmt: skip
        given = {a.split("=", 1)[0].lstrip("-") for a in sys.argv[1:] if a.startswith("--")}
        for name, value in tiny.items():
            if name not in given:
                setattr(args, name, value)
    return args


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    if args.arch == "tiny":
        cfg = vit_config("vit_tiny", args.patch_size, embed_dim=64, depth=2, num_heads=2)
        cfg = type(cfg).from_dict({**cfg.to_dict(), "img_size": args.global_size})
        hidden, bottleneck = 128, 32
    else:
        cfg = vit_config(args.arch, args.patch_size, img_size=args.global_size)
        hidden, bottleneck = 2048, 256
    student = MultiCropWrapper(
        VisionTransformer(cfg, drop_path_rate=0.1),
        DINOHead(cfg.embed_dim, args.out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck),
    ).to(device)
    teacher = MultiCropWrapper(
        VisionTransformer(cfg),
        DINOHead(cfg.embed_dim, args.out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck),
    ).to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def use_explicit_attention(model: nn.Module) -> None:
    """The original's attention: softmax(q k^T * scale) v, materialised."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(  # type: ignore[method-assign]
                lambda self, x: self.forward_with_attention(x)[0], module
            )


def use_reference_forward(model: nn.Module) -> None:
    """The original's backbone forward: each block's ``DropPath`` draws its own mask and
    computes ``x.div(keep_prob) * mask`` (five kernels a branch), and the final norm runs over
    every token before the CLS token is taken."""

    def forward(self: VisionTransformer, x: Tensor) -> Tensor:
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)  # no scales given: the block's DropPath draws them
        return self.norm(x)[:, 0]

    for module in model.modules():
        if isinstance(module, VisionTransformer):
            module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]


def use_reference_tokens(model: nn.Module) -> None:
    """The original's ``prepare_tokens``: ``F.interpolate`` with the +0.1 scale factor on the
    local crops, the stored table as it is for square inputs of the training size."""

    def prepare_tokens(self: VisionTransformer, x: Tensor) -> Tensor:
        width, height = x.shape[-1], x.shape[-2]
        tokens = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1)  # (B, 1 + N, D)
        stored = self.pos_embed.shape[1] - 1
        if tokens.shape[1] - 1 == stored and width == height:
            return tokens + self.pos_embed
        side, dim, p = int(math.sqrt(stored)), tokens.shape[-1], self.patch_size
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        scale = ((height // p + 0.1) / side, (width // p + 0.1) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")  # (1, D, h, w)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)  # (1, h*w, D)
        return tokens + torch.cat((self.pos_embed[:, :1], grid), dim=1)

    for module in model.modules():
        if isinstance(module, VisionTransformer):
            module.prepare_tokens = types.MethodType(prepare_tokens, module)  # type: ignore[method-assign]


def reference_loss(student: Tensor, teacher: Tensor, center: Tensor, ncrops: int) -> Tensor:
    s = (student / 0.1).chunk(ncrops)
    q = F.softmax((teacher - center) / 0.04, dim=-1).detach().chunk(2)
    total, n = torch.zeros((), device=student.device), 0
    for iq, qi in enumerate(q):
        for v in range(ncrops):
            if v != iq:
                total = total + torch.sum(-qi * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                n += 1
    return total / n


def make_reference_step(args, device, student, teacher, crops, _variant) -> Callable[[], None]:
    for model in (student, teacher):
        use_explicit_attention(model)
        use_reference_tokens(model)
        use_reference_forward(model)
        model.pack_crops = False  # one backbone call per crop resolution, as the original
    optimizer = torch.optim.AdamW(get_params_groups(student), foreach=False)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    center = torch.zeros(1, args.out_dim, device=device)
    ncrops = len(crops)

    def step() -> None:
        nonlocal center
        ctx = (
            torch.autocast("cuda", dtype=torch.float16)
            if cuda
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            t_out = teacher(crops[:2])
            s_out = student(crops)
            loss = reference_loss(s_out.float(), t_out.float(), center, ncrops)
        with torch.no_grad():
            center = 0.9 * center + 0.1 * t_out.float().mean(0, keepdim=True)
        if not np.isfinite(loss.item()):
            raise RuntimeError("non-finite loss")
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        for p in student.parameters():  # reference clip: one host sync per tensor
            if p.grad is not None:
                norm = p.grad.data.norm(2)
                coef = 3.0 / (norm.item() + 1e-6)
                if coef < 1:
                    p.grad.data.mul_(coef)
        cancel_gradients_last_layer(1, student, 1)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True):
                pt.data.mul_(0.996).add_((1 - 0.996) * ps.detach().data)

    return step


def make_optimised_step(args, device, student, teacher, crops, variant) -> Callable[[], None]:
    cuda = device.type == "cuda"
    precision, compile_mode = VARIANTS[variant]
    if compile_mode is not None:  # as training.pretrain --compile: one static graph per size
        student.backbone.compile(dynamic=False, mode=compile_mode)
        teacher.backbone.compile(dynamic=False, mode=compile_mode)
    optimizer = torch.optim.AdamW(get_params_groups(student), fused=True)  # CPU has it too
    fp16 = precision == "fp16" and cuda
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    dtype = torch.float16 if fp16 else torch.bfloat16
    loss_fn = DINOLoss(args.out_dim, len(crops), 0.04, 0.04, 0, 1).to(device)
    ema = ParameterEMA(student, teacher)

    def step() -> None:
        ctx = (
            torch.autocast(device.type, dtype=dtype)
            if cuda
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            loss = loss_fn(student(crops), teacher(crops[:2]), 0)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        clip_gradients(student, 3.0)
        cancel_gradients_last_layer(1, student, 1)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        ema.update(0.996)

    return step


def timed(fn: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Seconds ``steps`` calls of ``fn`` take after ``warmup`` calls (device work included;
    the CUDA peak-memory counter starts after the warm-up)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


# Operators that only make views: no kernel on the device.
VIEW_OPS = frozenset(
    [
        "view",
        "t",
        "detach",
        "transpose",
        "permute",
        "expand",
        "select",
        "_unsafe_view",
        "unsqueeze",
        "squeeze",
        "slice",
        "alias",
        "split",
        "split_with_sizes",
        "as_strided",
        "unbind",
        "chunk",
        "reshape",
        "_reshape_alias",
    ]
)


# Operators that read a tensor's value on the host (item, float(t), data-dependent shapes): on a
# GPU each one waits for the device to catch up.
HOST_SYNC_OPS = frozenset(
    ["_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_consecutive"]
)


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators that compute (not the views) while active, backward included,
    and among them those that read a value on the host (``syncs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.count += 1
        if name in HOST_SYNC_OPS:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def time_steps(step: Callable[[], None], args, device, compiled: bool) -> dict[str, Any]:
    cuda = device.type == "cuda"
    elapsed = timed(step, args.warmup, args.steps, device)
    out: dict[str, Any] = {"img_per_s": round(args.batch * args.steps / elapsed, 2)}
    out["step_ms"] = round(1000 * elapsed / args.steps, 2)
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        # CUDA graphs replay from a private pool that the allocated counter does not see after
        # recording: reserved memory is the comparable figure for the reduce-overhead variant.
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        out["cudagraph_skips"] = int(counters["inductor"]["cudagraph_skips"])
    if not compiled:  # eager steps: about one device kernel per operator (launch overhead)
        with OpCounter() as counter:
            step()
        out["aten_ops_per_step"] = counter.count
        out["host_syncs_per_step"] = counter.syncs
    return out


def synthetic_photo(seed: int) -> Image.Image:
    """A 500x375 image with gradients, edges and noise (augmentation cost depends on size)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500]
    base = np.stack([x / 500, y / 375, ((x // 25 + y // 25) % 2) * 0.6], axis=-1)
    img = np.clip(base * 200 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


AUG_SETTINGS = {
    # name: (global size, local size, local crops, global scale, local scale, canvas side)
    "2x224+10x96": (224, 96, 10, (0.4, 1.0), (0.05, 0.4), 256),
    "fashion_mnist_2x32+6x16": (32, 16, 6, (0.4, 1.0), (0.1, 0.4), 28),
}


def source_images(name: str, count: int) -> list[Image.Image]:
    """500x375 photos for the default setting, 28x28 grayscale-as-RGB for the small one."""
    if AUG_SETTINGS[name][5] == 28:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (count, 28, 28)).astype(np.uint8)
        return [Image.fromarray(img, mode="L").convert("RGB") for img in images]
    return [synthetic_photo(i) for i in range(count)]


def bench_cpu_augmentation(args, name: str) -> dict[str, Any]:
    """The reference PIL pipeline on one thread (plus the gpu path's loader canvas cut)."""
    g_size, l_size, n_local, g_scale, l_scale, canvas = AUG_SETTINGS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    aug = DataAugmentationDINO(g_scale, l_scale, n_local, g_size, l_size)
    images = source_images(name, min(args.aug_images, 8))
    aug(images[0])
    start = time.perf_counter()
    for i in range(args.aug_images):
        aug(images[i % len(images)])
    elapsed = time.perf_counter() - start
    loader_work = {  # what the loader does per image when the device augments
        "canvas": canvas_transform(None if canvas == 28 else canvas),
        "geometry": MultiCropGeometry(g_scale, l_scale, n_local, g_size, l_size),
    }
    loader_ms = {}
    for work, transform in loader_work.items():
        start = time.perf_counter()
        for i in range(args.aug_images):
            transform(images[i % len(images)])
        loader_ms[work] = round(1000 * (time.perf_counter() - start) / args.aug_images, 3)
    torch.set_num_threads(threads)
    return {
        "bench": "cpu_augmentation",
        "setting": name,
        "ms_per_image_per_core": round(1000 * elapsed / args.aug_images, 2),
        "img_per_s_per_core": round(args.aug_images / elapsed, 2),
        "canvas_ms_per_image_per_core": loader_ms["canvas"],
        "geometry_ms_per_image_per_core": loader_ms["geometry"],
        "crops": f"2x{g_size} + {n_local}x{l_size}",
        "source_image": f"{images[0].width}x{images[0].height}",
    }


def bench_batched_augmentation(args, name: str, device: torch.device, mode: str) -> dict[str, Any]:
    """``BatchedMultiCrop`` on the device: ``mode`` "whole" crops uint8 images (or canvases)
    there; "photometric" takes crops the loader cut (the default for image folders)."""
    g_size, l_size, n_local, g_scale, l_scale, canvas = AUG_SETTINGS[name]
    batch = args.aug_batch if canvas != 28 else 4 * args.aug_batch
    images = source_images(name, min(batch, 8))
    aug = BatchedMultiCrop(g_scale, l_scale, n_local, g_size, l_size)
    generator = torch.Generator(device=device).manual_seed(0)
    if mode == "whole":
        cut = canvas_transform(None if canvas == 28 else canvas)
        canvases = torch.stack([cut(images[i % len(images)]) for i in range(batch)]).to(device)

        def run() -> None:
            aug(canvases, generator)

        source = f"{canvas}x{canvas} uint8 canvases"
    else:
        geometry = MultiCropGeometry(g_scale, l_scale, n_local, g_size, l_size)
        cut_crops = [geometry(images[i % len(images)]) for i in range(batch)]
        crops = [torch.stack([c[v] for c in cut_crops]).to(device) for v in range(aug.ncrops)]

        def run() -> None:
            aug.photometric(crops, generator)

        source = "uint8 crops cut by the loader"
    cuda = device.type == "cuda"
    elapsed = timed(run, 2, args.aug_steps, device)
    hw = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()}"
    return {
        "bench": "batched_augmentation",
        "setting": name,
        "mode": mode,
        "img_per_s": round(batch * args.aug_steps / elapsed, 2),
        "ms_per_batch": round(1000 * elapsed / args.aug_steps, 2),
        "batch": batch,
        "crops": f"2x{g_size} + {n_local}x{l_size}",
        "input": source,
        "device": hw,
    }


def _cpu_model() -> str:
    """The CPU's model name (the per-core augmentation figures depend on it)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    hw = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    )
    crops = [torch.randn(args.batch, 3, args.global_size, args.global_size, device=device)] * 2
    crops = [c.clone() for c in crops] + [
        torch.randn(args.batch, 3, args.local_size, args.local_size, device=device)
        for _ in range(args.local_crops)
    ]
    setup = {
        "arch": args.arch, "patch": args.patch_size, "batch": args.batch, "out_dim": args.out_dim,
        "crops": f"2x{args.global_size} + {args.local_crops}x{args.local_size}",
        "device": hw, "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
    }  # fmt: skip
    print(json.dumps({"bench": "setup", **setup}), flush=True)
    student, teacher = build(args, device)
    runs = [("reference", "reference", make_reference_step)]
    runs += [(f"optimised_{v}", v, make_optimised_step) for v in args.variants]
    results: dict[str, dict[str, Any]] = {}
    for name, variant, factory in runs:
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        precision = "fp16" if variant == "reference" else VARIANTS[variant][0]
        if device.type == "cpu":
            precision = "fp32"
        record: dict[str, Any] = {"bench": f"train_step_{name}", "precision": precision}
        torch._dynamo.reset()  # each compiled variant starts clear of the recompile limit
        counters.clear()  # cudagraph_skips: a reduce-overhead variant that fell back to plain
        try:
            step = factory(args, device, s, t, crops, variant)
            compiled = variant != "reference" and VARIANTS[variant][1] is not None
            results[name] = time_steps(step, args, device, compiled)
            record.update(results[name])
            if name != "reference" and "reference" in results:
                ratio = results[name]["img_per_s"] / results["reference"]["img_per_s"]
                record["over_reference"] = round(ratio, 3)
        except Exception as err:  # one failing variant must not hide the others
            record["error"] = f"{type(err).__name__}: {err}"[:500]
        print(json.dumps(record), flush=True)
        del s, t
        step = None  # the closure holds the networks and optimiser: drop it before empty_cache
        # Patched methods and compiled modules make reference cycles: without a collection the
        # networks (and their grads) may stay on the device through the next variant's timing.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del student, teacher, crops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    failures = len(runs) - len(results)
    aug_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in AUG_SETTINGS:
        try:
            cpu = bench_cpu_augmentation(args, name)
        except Exception as err:  # one failing bench must not hide the others
            failures += 1
            print(json.dumps({"bench": "cpu_augmentation", "setting": name, "error": str(err)}))
            continue
        print(json.dumps(cpu), flush=True)
        modes = ["whole"] if AUG_SETTINGS[name][5] == 28 else ["photometric", "whole"]
        for mode in modes:
            try:
                batched = bench_batched_augmentation(args, name, aug_device, mode)
            except Exception as err:
                failures += 1
                record = {"bench": "batched_augmentation", "setting": name, "mode": mode}
                print(json.dumps({**record, "error": f"{type(err).__name__}: {err}"[:500]}))
                continue
            # The CPU work the device replaces: the whole PIL recipe less what the loader still
            # does per image in this mode (cut the crops, or cut a canvas).
            loader_ms = cpu[
                "geometry_ms_per_image_per_core"
                if mode == "photometric"
                else "canvas_ms_per_image_per_core"
            ]
            replaced_ms = max(cpu["ms_per_image_per_core"] - loader_ms, 1e-6)
            batched["cpu_cores_equivalent"] = round(batched["img_per_s"] * replaced_ms / 1000, 1)
            print(json.dumps(batched), flush=True)
    if failures:
        print(f"{failures} benchmark(s) failed; see their error records", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
