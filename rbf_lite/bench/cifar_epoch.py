"""Time one CIFAR-10 training epoch with the linear (cce) and the HALO head: images/s and wall time.

    python -m rbf_lite.bench.cifar_epoch --data ../shared/data --out bench/cifar_epoch.json

Each head gets a fresh `Trainer` (same seed, same backbone), a few warm-up steps (cuDNN
autotuning, torch.compile when asked), then one full timed epoch; `Trainer.train_epoch` ends by
reading the mean loss back from the device, so the timing includes all queued GPU work. HALO's
extra cost is its head: a (batch x D) by (D x K) matmul and a few elementwise terms.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

from ..cifar import Config, Trainer, resolve_device
from ..runs import environment, write_json


def time_epoch(cfg: Config, warmup_steps: int, repeats: int) -> dict:
    """Warm up, then time `repeats` full epochs; the fastest one is reported (least disturbed)."""
    trainer = Trainer(cfg)
    trainer.calibrate()
    trainer.train_epoch(max_steps=warmup_steps)
    epochs = [trainer.train_epoch() for _ in range(repeats)]
    fastest = min(epochs, key=lambda stats: stats["seconds"])
    return {"images_per_s": fastest["images_per_s"], "epoch_seconds": fastest["seconds"],
            "images": fastest["images"], "all_epoch_seconds": [stats["seconds"] for stats in epochs],
            "train_loss": fastest["train_loss"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m rbf_lite.bench.cifar_epoch", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="data folder, as for python -m rbf_lite.cifar")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--subset", type=int, default=None, help="time an epoch of this many images")
    parser.add_argument("--warmup-steps", type=int, default=10)
    # The first timed epoch still meets the short last batch's shape (cuDNN tunes it then): time 3.
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per head (fastest reported)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args(argv)

    results = {}
    for loss in ("cce", "halo"):
        cfg = Config(loss=loss, data=args.data, device=args.device, batch_size=args.batch_size,
                     width=args.width, subset=args.subset, compile=args.compile, epochs=args.repeats + 1, ood="",
                     out="unused")
        results[loss] = time_epoch(cfg, args.warmup_steps, args.repeats)
        print(f"{loss}: {results[loss]['images_per_s']:.0f} images/s, "
              f"epoch {results[loss]['epoch_seconds']:.2f} s")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    overhead = results["cce"]["images_per_s"] / results["halo"]["images_per_s"] - 1
    print(f"HALO costs {100 * overhead:+.2f}% per image relative to cce")
    report = {**environment(resolve_device(args.device)), "config": vars(args),
              "settings": dataclasses.asdict(cfg) | {"loss": "cce / halo"},
              "results": results, "halo_overhead": overhead}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
