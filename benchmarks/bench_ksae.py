#!/usr/bin/env python
"""k-SAE training throughput: our trainer against a original-style trainer, same data, same steps, one run.

The original-style baseline is written out here (fp32, TopK without ReLU, the code
scattered into a dense N × n_latents matrix, dense matmul decode, plain
autograd, batch-variance-normalised MSE, unit-norm decoder, no AuxK). Ours is
:func:`revelio_hub.sae.training.train_sae` (sparse TopK backward, embedding_bag
decoder, bf16 matmuls on CUDA, AuxK). Both train on the same synthetic
sparse-dictionary data for the same number of steps and batch size and are
evaluated on the same held-out samples (centred FVU, ``revelio_hub.sae.metrics``).

Prints samples/s of both, the ratio, and both held-out FVUs (``--json`` for a
machine-readable line). Targets: ratio ≥ 3× on CPU at the default reduced size;
on an H100/H200 at the paper's size (``--d-in 1280 --expansion 64 --k 32
--batch-size 8192``) ≥ 640k samples/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="paper size on a GPU: --device cuda --d-in 1280 --expansion 64 --k 32 --batch-size 8192")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="Device (default: %(default)s).")
    p.add_argument("--d-in", type=int, default=256, help="Feature dimension (default: %(default)s).")
    p.add_argument("--expansion", type=int, default=16, help="n_latents = expansion x d_in (default: %(default)s).")
    p.add_argument("--k", type=int, default=32, help="Active latents (default: %(default)s).")
    p.add_argument("--batch-size", type=int, default=1024, help="Batch size (default: %(default)s).")
    p.add_argument("--steps", type=int, default=60, help="Timed training steps for each trainer (default: %(default)s).")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (allocator, kernels) (default: %(default)s).")
    p.add_argument("--samples", type=int, default=32768, help="Synthetic training samples (default: %(default)s).")
    p.add_argument("--lr", type=float, default=4e-4, help="Adam learning rate for both (default: %(default)s).")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default with --device cpu: 1, because on a shared machine "
                        "multi-threaded small ops stall on descheduled threads and the ratio becomes noise; "
                        "with cuda: torch's default).")
    p.add_argument("--no-cpu-bf16", dest="cpu_bf16", action="store_false",
                   help="Skip the extra bf16 measurement of ours on CPUs with native bf16.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Print one JSON line instead of a table.")
    return p.parse_args(argv)


def make_data(n: int, d: int, seed: int):
    """Sparse-dictionary data (4·d atoms, ~16 active, positive coefficients) plus a mean offset, like real features."""
    import torch

    g = torch.Generator().manual_seed(seed)
    m = 4 * d
    atoms = torch.randn(m, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    mask = torch.rand(n, m, generator=g) < 16 / m
    coef = (0.5 + torch.rand(n, m, generator=g)) * mask
    return coef @ atoms + 2.0 * torch.randn(d, generator=g)


def original_style_train(x, steps: int, batch: int, n_latents: int, k: int, lr: float, seed: int, device):
    """The baseline: the original Revelio code's step, written out (dense everything, fp32, plain autograd)."""
    import torch

    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(n_latents, d, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    W_enc = w_dec.t().clone().to(device).requires_grad_()
    W_dec = w_dec.to(device).requires_grad_()
    b_enc = torch.zeros(n_latents, device=device, requires_grad=True)
    b_dec = x.mean(0).to(device).requires_grad_()
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=lr)
    data = x.to(device)
    order = torch.randperm(x.shape[0], generator=g).to(device)
    per_epoch = x.shape[0] // batch
    start = time.perf_counter()
    for step in range(steps):
        xb = data[order[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]]
        pre = (xb - b_dec) @ W_enc + b_enc
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        recon = z @ W_dec + b_dec
        loss = (recon - xb).pow(2).sum() / (xb - xb.mean(0)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    loss.item()  # one sync at the end, like a logging step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    @torch.no_grad()
    def reconstruct(xe):
        out = []
        for i in range(0, xe.shape[0], batch):
            xb = xe[i : i + batch].to(device)
            top = ((xb - b_dec) @ W_enc + b_enc).topk(k, dim=-1)
            z = torch.zeros(xb.shape[0], n_latents, device=device).scatter(-1, top.indices, top.values)
            out.append((z @ W_dec + b_dec).cpu())
        return torch.cat(out)

    return seconds, reconstruct


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from revelio_hub.sae import metrics
    from revelio_hub.sae.training import SAETrainConfig, evaluate_sae, train_sae

    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    n_latents = args.expansion * args.d_in
    x = make_data(args.samples + 4096, args.d_in, args.seed)
    train_x, held_out = x[:-4096], x[-4096:]
    if train_x.shape[0] < args.batch_size:
        print(f"error: --samples {args.samples} < --batch-size {args.batch_size}", file=sys.stderr)
        return 2

    # ---- seed style (a short warm-up run first, then the timed one)
    original_style_train(train_x, args.warmup, args.batch_size, n_latents, args.k, args.lr, args.seed, device)
    base_s, base_recon = original_style_train(train_x, args.steps, args.batch_size, n_latents, args.k, args.lr, args.seed, device)
    base_fvu = metrics.fvu(held_out, base_recon(held_out))

    # ---- ours (same data, steps, batch, lr; paper settings otherwise)
    from accelerate import Accelerator

    acc = Accelerator(cpu=args.device == "cpu")

    def ours(steps, precision):
        cfg = SAETrainConfig(k=args.k, n_latents=n_latents, batch_size=args.batch_size, steps=steps, lr=args.lr,
                             warmup_steps=0, eval_fraction=0.0, log_every=10, checkpoint_every=0,
                             dead_window=min(10_000_000, train_x.shape[0]), seed=args.seed, mixed_precision=precision)
        return train_sae(train_x, cfg, accelerator=acc, progress=False)

    # "auto" is what users get: bf16 matmuls on CUDA, fp32 on CPU. On a CPU with native bf16
    # (AVX512-BF16/AMX) the opt-in bf16 path is measured as well.
    variants = ["auto"]
    if device.type == "cpu" and args.cpu_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        variants.append("bf16")
    n = args.steps * args.batch_size
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "d_in": args.d_in,
        "n_latents": n_latents,
        "k": args.k,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "original_style_samples_per_s": n / base_s,
        "original_style_heldout_fvu": base_fvu,
    }
    for precision in variants:
        ours(args.warmup, precision)
        result = ours(args.steps, precision)
        our_fvu = evaluate_sae(result.model.to(device), held_out, batch_size=args.batch_size)["fvu"]
        tag = "ours" if precision == "auto" else "ours_cpu_bf16"
        report[f"{tag}_samples_per_s"] = n / result.train_seconds
        report[f"{tag}_ratio"] = base_s / result.train_seconds
        report[f"{tag}_heldout_fvu"] = our_fvu
        report[f"{tag}_fvu_no_worse"] = our_fvu <= base_fvu
    report["ratio"] = report["ours_ratio"]
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>28}: {value:,.4f}" if isinstance(value, float) else f"{key:>28}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
