"""Demo: the fused CLIP loss against eager PyTorch on a random batch.

    python -m fastclip.demo                # or: fastclip-demo
    python -m fastclip.demo --n 65536 --dim 768 --dtype bfloat16

Prints both losses, how far the fused loss and its gradients are from eager's, the time of a
forward+backward and the peak memory each adds.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fastclip.loss import clip_loss
from fastclip.measure import peak_memory_bytes, time_ms
from fastclip.reference import clip_loss_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=32768 if cuda else 4096, help="batch size N")
    p.add_argument("--dim", type=int, default=512, help="embedding width D")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16" if cuda else "float32")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 1 or args.dim < 1:
        p.error("--n and --dim must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def features() -> torch.Tensor:
        f = F.normalize(torch.randn(args.n, args.dim, generator=gen), dim=-1)
        return f.to(device=device, dtype=dtype).requires_grad_()

    images, texts = features(), features()
    logit_scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)

    def step(loss_fn):
        for t in (images, texts, logit_scale):
            t.grad = None
        loss = loss_fn(images, texts, logit_scale)
        loss.backward()
        return loss.detach().float(), images.grad.float(), texts.grad.float()

    print(f"fastclip demo: CLIP loss, N={args.n}, D={args.dim}, {args.dtype}, on {device}")
    rows, results = [], {}
    for name, fn in (("fastclip", clip_loss), ("eager PyTorch", clip_loss_reference)):
        try:
            results[name] = step(fn)
            ms = time_ms(lambda fn=fn: step(fn), device, repeats=args.repeats)
            peak = peak_memory_bytes(lambda fn=fn: step(fn), device)
        except torch.OutOfMemoryError:
            rows.append(f"{name:<14} {'out of memory':>12}")
            continue
        mib = "n/a" if peak is None else f"{peak / 2**20:.0f}"
        rows.append(f"{name:<14} {results[name][0].item():>12.6f} {ms:>14.1f} {mib:>13}")
    print(f"{'':<14} {'loss':>12} {'fwd+bwd ms':>14} {'peak MiB':>13}")
    print("\n".join(rows))
    if len(results) == 2:
        (loss, gi, gt), (ref, ri, rt) = results["fastclip"], results["eager PyTorch"]
        print(
            f"agreement: |loss diff| = {abs(loss - ref).item():.2e}, max |grad diff| = "
            f"{(gi - ri).abs().max().item():.2e} (images), {(gt - rt).abs().max().item():.2e} "
            "(texts)"
        )


if __name__ == "__main__":
    main()
