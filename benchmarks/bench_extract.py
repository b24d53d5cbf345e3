#!/usr/bin/env python
"""Feature extraction speed: original-style baseline vs ``Backbone.extract``, same inputs, same run.

Builds an SD1.5-architecture UNet and VAE with random weights (the real
checkpoint's configs, so the FLOPs match; ``--small`` shrinks the widths for
CPUs) and times two workloads:

* sweep: 3 timesteps × 2 layers (``bottleneck``, ``up_ft1``);
* single: ``bottleneck`` at t = 25.

The original-style baseline does what the paper's code does per (layer, t): VAE
encode, fresh random noise, a full fp32 UNet forward with a hook. Our path
encodes once per batch, captures all layers in one pass that stops after the
deepest one, runs channels_last, and on CUDA bf16 (``--compile`` also compiles
the VAE encoder and the UNet's block internals, see ``Backbone.compile``). Prints img/s for both, the ratio and, on CUDA at full size,
the fraction of the bf16 FLOP limit (GFLOP figures: docs/benchmarks.md, GPU figures).

    python benchmarks/bench_extract.py --small --device cpu
    python benchmarks/bench_extract.py --device cuda --batch-size 32 --json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Callable

import torch

SWEEP_LAYERS = ("bottleneck", "up_ft1")
SWEEP_TIMESTEPS = (25, 100, 200)

# docs/benchmarks.md (GPU figures, external estimates): GFLOP per 512-px image (scale with pixel count) and the bf16 limit.
GFLOP_512 = {"vae": 1117.0, "bottleneck": 250.0, "up_ft1": 460.0, "full": 800.0}
BF16_LIMIT_TFLOPS = 803.0


def sd15_unet_config(small: bool) -> dict:
    """SD 1.5's UNet config (``unet/config.json``); ``small`` only narrows the widths."""
    config = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu",
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1,
        norm_eps=1e-5, center_input_sample=False,
    )
    if small:
        config.update(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64)
    return config


def sd15_vae_config(small: bool) -> dict:
    """SD 1.5's VAE config (``vae/config.json``); ``small`` only narrows the widths."""
    config = dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, act_fn="silu", scaling_factor=0.18215,
    )
    if small:
        config.update(block_out_channels=(32, 32, 64, 64))
    return config


def sd15_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)


def build_models(small: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**sd15_unet_config(small)).eval()
    vae = AutoencoderKL(**sd15_vae_config(small)).eval()
    return unet, vae


class OriginalStyleExtractor:
    """The original Revelio code's per-call path: encode, fresh noise, full fp32 forward, hook one block."""

    def __init__(self, unet, vae, scheduler, context: torch.Tensor, device: torch.device):
        from diffusers import DDPMScheduler

        self.unet, self.vae, self.device = unet.to(device), vae.to(device), device
        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        self.context = context.to(device)
        self.blocks = {"bottleneck": unet.mid_block, **{f"up_ft{i}": b for i, b in enumerate(unet.up_blocks)}}

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor, layer: str, t: int) -> torch.Tensor:
        pixels = pixels.to(self.device)
        latents = self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        steps = torch.full((latents.shape[0],), t, device=self.device, dtype=torch.long)
        noisy = self.scheduler.add_noise(latents, noise, steps)
        store = {}
        handle = self.blocks[layer].register_forward_hook(lambda m, i, o: store.__setitem__("x", o))
        try:
            self.unet(noisy, steps, encoder_hidden_states=self.context.expand(len(noisy), -1, -1))
        finally:
            handle.remove()
        return store["x"].float().cpu()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_pair(fns: dict[str, Callable[[], object]], device: torch.device,
               repeats: int) -> dict[str, tuple[float, float]]:
    """Best-of-``repeats`` (wall, process CPU) seconds of each function, interleaved so load
    drifts hit both alike. CPU time is the steadier figure on a shared, oversubscribed CPU."""
    for fn in fns.values():  # warm-up (allocator, kernels, compilation)
        fn()
    wall = {name: float("inf") for name in fns}
    cpu = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[name] = min(wall[name], time.perf_counter() - start)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return {name: (wall[name], cpu[name]) for name in fns}


def flop_limit_img_s(image_size: int, layers, timesteps) -> float:
    """Images/s at the bf16 FLOP limit for the minimum work: one encode + one pass to the deepest layer per t."""
    scale = (image_size / 512) ** 2
    deepest = max(GFLOP_512[layer] for layer in layers)
    gflop = (GFLOP_512["vae"] + len(timesteps) * deepest) * scale
    return BF16_LIMIT_TFLOPS * 1e3 / gflop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where to run both paths (default: cuda if available)")
    parser.add_argument("--small", action="store_true", help="narrow widths (same structure) so a CPU finishes quickly")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default 32 on cuda, 4 on cpu)")
    parser.add_argument("--batches", type=int, default=None, help="batches per timing (default 4 on cuda, 1 on cpu)")
    parser.add_argument("--image-size", type=int, default=None, help="input side in px (default 512, 128 with --small)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats, best kept (default 3)")
    parser.add_argument("--compile", action="store_true", help="torch.compile our VAE encoder and UNet block internals (Backbone.compile; worth it on cuda)")
    parser.add_argument("--no-bf16", action="store_true", help="keep our path in fp32 on cuda too")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="keep our path in NCHW (channels_last is on by default; it also helps oneDNN on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()

    from revelio_hub.backbones import StableDiffusionBackbone

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest conv kernels
    batch_size = args.batch_size or (32 if cuda else 4)
    batches = args.batches or (4 if cuda else 1)
    image_size = args.image_size or (128 if args.small else 512)
    repeats = args.repeats or 3
    n_images = batch_size * batches

    unet, vae = build_models(args.small)
    scheduler = sd15_scheduler()
    context = torch.randn(1, 77, unet.config.cross_attention_dim)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(n_images, 3, image_size, image_size, generator=generator) * 2 - 1
    batches_cpu = list(pixels.split(batch_size))

    original = OriginalStyleExtractor(unet, vae, scheduler, context, device)

    def run_original(layers, timesteps):
        for layer in layers:
            for t in timesteps:
                for chunk in batches_cpu:
                    original(chunk, layer, t)

    dtype = torch.bfloat16 if cuda and not args.no_bf16 else torch.float32
    # Our backbone gets its own copies: it may cast them to bf16 / channels_last.
    ours = StableDiffusionBackbone(
        copy.deepcopy(unet), copy.deepcopy(vae), scheduler, prompt_embeds=context, device=device, dtype=dtype,
        image_size=image_size, channels_last=not args.no_channels_last, name="random-sd15",
    )
    if args.compile:
        ours.compile()  # VAE encoder + the UNet's modules inside each block (hooks stay eager)

    workloads = {"sweep": (SWEEP_LAYERS, SWEEP_TIMESTEPS), "single": (("bottleneck",), (25,))}
    original_s, our_s, original_cpu, our_cpu = {}, {}, {}, {}
    for name, (layers, timesteps) in workloads.items():
        times = timed_pair({
            "original": lambda l=layers, t=timesteps: run_original(l, t),
            "ours": lambda l=layers, t=timesteps: ours.extract_pixels(pixels, l, t, batch_size=batch_size),
        }, device, repeats)
        (original_s[name], original_cpu[name]), (our_s[name], our_cpu[name]) = times["original"], times["ours"]

    results = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "config": {"small": args.small, "image_size": image_size, "batch_size": batch_size, "images": n_images,
                   "repeats": repeats, "our_dtype": str(dtype).replace("torch.", ""),
                   "channels_last": not args.no_channels_last,
                   "compile": args.compile, "threads": torch.get_num_threads()},
    }
    for name, (layers, timesteps) in workloads.items():
        entry = {
            "layers": list(layers), "timesteps": list(timesteps),
            "original_style_img_s": n_images / original_s[name], "ours_img_s": n_images / our_s[name],
            "ratio": original_s[name] / our_s[name],
            "original_style_cpu_s": original_cpu[name], "ours_cpu_s": our_cpu[name],
            "cpu_time_ratio": original_cpu[name] / our_cpu[name],
        }
        if cuda and not args.small:
            limit = flop_limit_img_s(image_size, layers, timesteps)
            entry["flop_limit_img_s"] = limit
            entry["fraction_of_flop_limit"] = entry["ours_img_s"] / limit
        results[name] = entry

    if args.json:
        print(json.dumps(results, indent=1))
        return
    print(f"device {results['device']}  " + "  ".join(f"{k}={v}" for k, v in results["config"].items()))
    for name in workloads:
        e = results[name]
        line = (f"{name:6s} {'+'.join(e['layers'])} × t{e['timesteps']}: original-style {e['original_style_img_s']:.2f} img/s, "
                f"ours {e['ours_img_s']:.2f} img/s, ratio {e['ratio']:.2f}× (process CPU-time ratio "
                f"{e['cpu_time_ratio']:.2f}×)")
        if "fraction_of_flop_limit" in e:
            line += f", {e['fraction_of_flop_limit']:.1%} of the bf16 FLOP limit ({e['flop_limit_img_s']:.0f} img/s)"
        print(line)


if __name__ == "__main__":
    main()
