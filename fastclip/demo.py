"""Demo: the fused CLIP loss against eager PyTorch on a random batch.

    python -m fastclip.demo                # or: fastclip-demo
    python -m fastclip.demo --n 65536 --dim 768 --dtype bfloat16

Prints both losses, how far the fused loss and its gradients are from eager's, the time of a
forward+backward (the median of runs that alternate between the two, after a warm-up of each)
and the peak memory each adds (the most tensor memory live at once during one forward+backward,
beyond what was allocated before it).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from fastclip.loss import clip_loss
from fastclip.measure import peak_memory_bytes, time_ms
from fastclip.reference import clip_loss_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVIDERS = {"fastclip": clip_loss, "eager PyTorch": clip_loss_reference}


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
    results, rows = {}, {}
    for name, fn in PROVIDERS.items():  # the warm-up, and the values compared
        try:
            results[name] = step(fn)
        except torch.OutOfMemoryError:
            rows[name] = f"{name:<14} {'out of memory':>12}"
    times = {name: [] for name in results}
    for _ in range(args.repeats):  # in turn, so that neither always runs in the other's wake
        for name in results:
            fn = PROVIDERS[name]
            times[name].append(time_ms(lambda fn=fn: step(fn), device, repeats=1, warmup=0))
    for name in results:
        peak = peak_memory_bytes(lambda fn=PROVIDERS[name]: step(fn), device)
        ms, loss = statistics.median(times[name]), results[name][0].item()
        rows[name] = f"{name:<14} {loss:>12.6f} {ms:>14.1f} {peak / 2**20:>13.1f}"
    print(f"{'':<14} {'loss':>12} {'fwd+bwd ms':>14} {'peak MiB':>13}")
    print("\n".join(rows[name] for name in PROVIDERS))
    if len(results) == 2:
        (loss, gi, gt), (ref, ri, rt) = results["fastclip"], results["eager PyTorch"]
        print(
            f"agreement: |loss diff| = {abs(loss - ref).item():.2e}, max |grad diff| = "
            f"{(gi - ri).abs().max().item():.2e} (images), {(gt - rt).abs().max().item():.2e} "
            "(texts)"
        )


if __name__ == "__main__":
    main()
