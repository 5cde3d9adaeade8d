"""Training-step and data-pipeline throughput of DINO pretraining (prints JSON lines).

(a) "reference": the original implementation's step emulated on the same networks: explicit
    softmax attention, fp16 autocast + GradScaler, for-loop AdamW, per-tensor clipping with a
    host sync per tensor, the pairwise loss loop and a per-parameter Python EMA loop.
(b) "optimised": our step: fused attention, bf16 autocast (fp16 + scaler with --precision fp16),
    fused AdamW, foreach clipping and EMA, the factored loss.
Both run the same math on synthetic crops already on the device. Then the multi-crop
augmentation, for 2x224 + 10x96 crops and for a Fashion-MNIST-like setting (28x28 images,
2x32 + 6x16 crops): the CPU path's images/s per core (PIL, one thread; the default setting from
500x375 photos) and the batched device-side path's images/s (``training.gpu_augment``, on the
GPU, or on every CPU thread without CUDA; the default setting from 256x256 uint8 canvases, as
the loader cuts them for 224 crops). No network needed.

    python bench/train_throughput.py            # CUDA defaults: ViT-S/16, 2x224 + 10x96, batch 64
    python bench/train_throughput.py --tiny     # seconds on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from models.layers import Attention
from models.vit import VisionTransformer, vit_config
from training.augment import DataAugmentationDINO
from training.data import canvas_transform
from training.ema import ParameterEMA
from training.gpu_augment import BatchedMultiCrop
from training.heads import DINOHead
from training.loss import DINOLoss
from training.multicrop import MultiCropWrapper
from training.optim import cancel_gradients_last_layer, clip_gradients, get_params_groups


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
    p.add_argument("--precision", choices=["bf16", "fp16"], default="bf16", help="optimised step")
    p.add_argument("--compile", action="store_true", help="torch.compile the optimised backbones")
    p.add_argument("--aug_images", type=int, default=40, help="images for the CPU pipeline bench")
    p.add_argument("--aug_batch", type=int, default=64, help="batch of the batched augmentation")
    p.add_argument("--aug_steps", type=int, default=20, help="timed batches of it")
    args = p.parse_args()
    if args.tiny:
        args.arch, args.patch_size, args.batch, args.out_dim = "tiny", 8, 8, 1024
        args.global_size, args.local_size, args.local_crops = 32, 16, 4
        args.steps, args.warmup, args.aug_images = 5, 1, 4
        args.aug_batch, args.aug_steps = 4, 2
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


def make_reference_step(args, device, student, teacher, crops) -> Callable[[], None]:
    use_explicit_attention(student)
    use_explicit_attention(teacher)
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


def make_optimised_step(args, device, student, teacher, crops) -> Callable[[], None]:
    cuda = device.type == "cuda"
    if args.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    optimizer = torch.optim.AdamW(get_params_groups(student), fused=cuda)
    fp16 = args.precision == "fp16" and cuda
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


def time_steps(step: Callable[[], None], args, device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out: dict[str, Any] = {"img_per_s": round(args.batch * args.steps / elapsed, 2)}
    out["step_ms"] = round(1000 * elapsed / args.steps, 2)
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
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
    cut = canvas_transform(None if canvas == 28 else canvas)
    start = time.perf_counter()
    for i in range(args.aug_images):
        cut(images[i % len(images)])
    cut_elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    return {
        "bench": "cpu_augmentation",
        "setting": name,
        "ms_per_image_per_core": round(1000 * elapsed / args.aug_images, 2),
        "img_per_s_per_core": round(args.aug_images / elapsed, 2),
        "canvas_ms_per_image_per_core": round(1000 * cut_elapsed / args.aug_images, 3),
        "crops": f"2x{g_size} + {n_local}x{l_size}",
        "source_image": f"{images[0].width}x{images[0].height}",
    }


def bench_batched_augmentation(args, name: str, device: torch.device) -> dict[str, Any]:
    """``BatchedMultiCrop`` on uint8 canvases already on the device."""
    g_size, l_size, n_local, g_scale, l_scale, canvas = AUG_SETTINGS[name]
    batch = args.aug_batch if canvas != 28 else 4 * args.aug_batch
    cut = canvas_transform(None if canvas == 28 else canvas)
    images = source_images(name, min(batch, 8))
    canvases = torch.stack([cut(images[i % len(images)]) for i in range(batch)]).to(device)
    aug = BatchedMultiCrop(g_scale, l_scale, n_local, g_size, l_size)
    generator = torch.Generator(device=device).manual_seed(0)
    cuda = device.type == "cuda"
    for _ in range(2):
        aug(canvases, generator)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.aug_steps):
        aug(canvases, generator)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    hw = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()}"
    return {
        "bench": "batched_augmentation",
        "setting": name,
        "img_per_s": round(batch * args.aug_steps / elapsed, 2),
        "ms_per_batch": round(1000 * elapsed / args.aug_steps, 2),
        "batch": batch,
        "crops": f"2x{g_size} + {n_local}x{l_size}",
        "canvas": f"{canvas}x{canvas} uint8",
        "device": hw,
    }


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
        "device": hw, "torch": torch.__version__,
    }  # fmt: skip
    print(json.dumps({"bench": "setup", **setup}), flush=True)
    student, teacher = build(args, device)
    results = {}
    for name, factory in (("reference", make_reference_step), ("optimised", make_optimised_step)):
        s, t = copy.deepcopy(student), copy.deepcopy(teacher)
        step = factory(args, device, s, t, crops)
        precision = "fp16" if name == "reference" else args.precision
        if device.type == "cpu":
            precision = "fp32"
        results[name] = time_steps(step, args, device)
        print(
            json.dumps({"bench": f"train_step_{name}", "precision": precision, **results[name]}),
            flush=True,
        )
        del s, t, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratio = results["optimised"]["img_per_s"] / results["reference"]["img_per_s"]
    print(json.dumps({"bench": "speedup", "optimised_over_reference": round(ratio, 3)}), flush=True)
    del student, teacher, crops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    aug_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in AUG_SETTINGS:
        cpu = bench_cpu_augmentation(args, name)
        print(json.dumps(cpu), flush=True)
        batched = bench_batched_augmentation(args, name, aug_device)
        batched["cpu_cores_equivalent"] = round(batched["img_per_s"] / cpu["img_per_s_per_core"], 1)
        print(json.dumps(batched), flush=True)


if __name__ == "__main__":
    main()
