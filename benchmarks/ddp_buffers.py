"""CRD under DDP: the step time with its memory banks left out of DDP's per-step buffer broadcast
(what kdkit does: ``Distiller.rank_synced_buffers``) against broadcasting them from rank 0 before
every step (DDP's default for every buffer, and kdkit's behaviour before).

The work is CRD on full-size CIFAR-10 (``--samples`` 50,000 dataset indices, so two banks of
50,000 x 128 floats, 51 MB), a resnet20 teacher and resnet8 student on random 32x32 images, batch
64 per rank, 2 ranks over gloo on the CPU, one torch thread each. The two settings alternate,
``--rounds`` runs each, every run a fresh 2-process fit of ``--steps`` steps; a step is the time
between two consecutive ``on_train_batch_end`` calls on rank 0 (the first ``--warmup`` dropped).

    python benchmarks/ddp_buffers.py [--samples 50000] [--steps 30] [--rounds 2] [--nce-k 16384]

Last line: ``ddp_crd_step_ratio=X`` = median step with the banks broadcast / median step without.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import header, write  # noqa: E402

SETTINGS = ("banks kept out of the broadcast (kdkit)", "banks broadcast every step (DDP default)")


class RandomImages:
    """``n`` dataset rows (random 32x32 images made from the row index), 10 classes."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import torch

        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, 32, 32, generator=g), "label": torch.randint(0, 10, (), generator=g),
                "index": torch.tensor(i)}


def _worker(rank: int, port: int, samples: int, steps: int, nce_k: int, broadcast: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0",
                      WORLD_SIZE="2")
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from kdkit.distillers.crd import CRD
    from kdkit.models.cifar_resnet import resnet8, resnet20
    from kdkit.tasks.classification import ClassificationTask

    torch.set_num_threads(1)
    if broadcast:  # the behaviour before: DDP syncs the banks like any other buffer
        CRD.rank_synced_buffers = property(lambda self: ())

    class Data(L.LightningDataModule):
        num_classes, num_train_samples = 10, samples

        def example_batch(self):
            return next(iter(DataLoader(RandomImages(samples), batch_size=4)))

        def train_dataloader(self):
            return DataLoader(RandomImages(samples), batch_size=64, shuffle=True, drop_last=True)

    class Steps(L.Callback):
        def __init__(self):
            self.ends = []

        def on_train_batch_end(self, *args):
            self.ends.append(time.perf_counter())

    torch.manual_seed(0)
    task = ClassificationTask(resnet8(10), resnet20(10),
                              distillers={"crd": CRD(nce_k=nce_k)}, num_classes=10,
                              optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))
    clock = Steps()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[clock], limit_val_batches=0)
    trainer.fit(task, datamodule=Data())
    if rank == 0:
        Path(out).write_text(json.dumps([b - a for a, b in zip(clock.ends, clock.ends[1:])]))


def one_run(samples: int, steps: int, nce_k: int, broadcast: bool) -> list[float]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "steps.json")
        mp.start_processes(_worker, args=(port, samples, steps, nce_k, broadcast, out), nprocs=2, join=True,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50_000, help="dataset rows: the banks' length")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nce-k", type=int, default=16384, help="CRD negatives per sample (RepDistiller: 16384)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    times: dict[str, list[float]] = {s: [] for s in SETTINGS}
    for rnd in range(args.rounds):
        for setting in SETTINGS:
            steps = one_run(args.samples, args.steps, args.nce_k, broadcast=setting == SETTINGS[1])
            times[setting] += steps[args.warmup:]
            print(f"round {rnd}: {setting}: median {statistics.median(steps[args.warmup:]) * 1e3:.0f} ms", flush=True)
    kept, synced = (statistics.median(times[s]) for s in SETTINGS)
    bank_mb = 2 * args.samples * 128 * 4 / 1e6
    lines = [header("CRD memory banks under DDP"), "",
             f"CRD (feat_dim 128, nce_k {args.nce_k:,}) with {args.samples:,} dataset rows: two banks of "
             f"{bank_mb:.0f} MB in all. resnet20 teacher -> resnet8 student, random 32x32 images, batch 64 "
             f"per rank, 2 ranks (gloo, CPU, 1 thread each), {args.steps} steps per run, the first "
             f"{args.warmup} dropped, {args.rounds} runs per setting alternating.", "",
             "| setting | median step (ms) | timed steps |", "|---|---|---|"]
    lines += [f"| {s} | {statistics.median(t) * 1e3:.0f} | {len(t)} |" for s, t in times.items()]
    lines += ["", f"Broadcasting the banks costs {synced / kept:.2f}x the step: the {bank_mb:.0f} MB go from rank 0 "
              "to every rank before each forward, although every rank already applies the same gathered updates."]
    write(f"ddp_buffers_k{args.nce_k}.md", "\n".join(lines) + "\n")
    print(f"ddp_crd_step_ratio={synced / kept:.3f}")


if __name__ == "__main__":
    main()
