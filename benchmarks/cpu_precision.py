"""Training throughput of the CIFAR ResNets per precision / memory format, side by side.

Answers "should this machine train in bf16?": on CPUs without native bf16 (AVX2-only), autocast
emulates it and is much slower than fp32; channels_last helps fp32 convolutions.

    python benchmarks/cpu_precision.py --models resnet8 resnet20 resnet56 --threads 1
    python benchmarks/cpu_precision.py --results cpu_precision_amx.md      # on a CPU with AMX
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import header, write  # noqa: E402

MODES = ("fp32", "fp32+channels_last", "bf16+channels_last")


def throughput(name: str, mode: str, batch: int, steps: int) -> float:
    import torch

    from kdkit.models import cifar_resnet

    model = getattr(cifar_resnet, name)(num_classes=10)
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if "channels_last" in mode:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet8", "resnet20", "resnet56"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="modes alternate each round to share the noise")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default="cpu_precision.md",
                   help="file under benchmarks/results (one per CPU kind: the answer differs)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split() if "bf16" in f or "amx" in f or f in ("avx2", "avx512f")})
    rows = []
    for name in args.models:
        best = {m: 0.0 for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                best[mode] = max(best[mode], throughput(name, mode, args.batch, args.steps))
        rows.append((name, best))
        print(name, {m: round(v) for m, v in best.items()}, flush=True)
    lines = [header("Training throughput by precision on this CPU"), "",
             f"CPU flags of note: {', '.join(flags) or 'none'}. Batch {args.batch}, best of "
             f"{args.rounds} alternating rounds of {args.steps} SGD steps, images/s.", "",
             "| model | fp32 | fp32 + channels_last | bf16 autocast + channels_last | bf16 / fp32+cl |",
             "|---|---|---|---|---|"]
    for name, best in rows:
        lines.append(f"| {name} | {best['fp32']:.0f} | {best['fp32+channels_last']:.0f} | "
                     f"{best['bf16+channels_last']:.0f} | "
                     f"{best['bf16+channels_last'] / best['fp32+channels_last']:.2f}x |")
    write(args.results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
