"""Time CIFAR-10 training with the linear (cce) and the HALO head: images/s and wall time.

    python -m rbf_lite.bench.cifar_epoch --data ../shared/data --out bench/cifar_epoch.json

Both heads get a fresh `Trainer` (same seed, same backbone) and a warm-up epoch (cuDNN autotuning,
torch.compile when asked); then they train in alternating turns of a few steps (`time_epochs`).
Each turn ends by reading the mean loss back from the device (`Trainer.train_epoch`), so the
timing includes all queued GPU work.
HALO's extra cost is its head: on the GPU one fused Triton kernel (`rbf_lite.kernels.halo_head`)
against the linear layer and cross-entropy.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics

from ..cifar import Config, Trainer, resolve_device
from ..runs import environment, write_json


def time_epochs(configs: dict[str, Config], warmup_epochs: int, repeats: int, chunk_steps: int) -> dict:
    """Warm every head up, then train `repeats` epochs' worth of steps with each, taking turns every
    `chunk_steps` steps (A B B A A B ...).

    A training step is host-bound, and the host's speed here drifts by 10-25% from one epoch to
    the next: timed epoch after epoch, the two heads would be compared on different machines.
    Turns of a few steps put both heads on the same machine state. Reported per head: images/s
    over all timed steps, the full epoch's wall time at that rate, and the median of the turns.
    """
    trainers = {name: Trainer(cfg) for name, cfg in configs.items()}
    for trainer in trainers.values():
        trainer.calibrate()
        for _ in range(warmup_epochs):  # cuDNN tunes the short last batch in the first epoch
            trainer.train_epoch()
    turns = {name: [] for name in trainers}
    steps_per_epoch = next(iter(trainers.values())).steps_per_epoch
    for turn in range(math.ceil(repeats * steps_per_epoch / chunk_steps)):
        for name in (list(trainers) if turn % 2 == 0 else list(trainers)[::-1]):
            turns[name].append(trainers[name].train_epoch(max_steps=chunk_steps))
    results = {}
    for name, stats in turns.items():
        images, seconds = sum(s["images"] for s in stats), sum(s["seconds"] for s in stats)
        epoch_images = len(trainers[name].train_set)
        results[name] = {"images_per_s": images / seconds, "epoch_seconds": epoch_images / (images / seconds),
                         "median_turn_images_per_s": statistics.median(s["images_per_s"] for s in stats),
                         "timed_images": images, "timed_seconds": seconds, "turns": len(stats),
                         "train_loss": stats[-1]["train_loss"]}
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m rbf_lite.bench.cifar_epoch", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="data folder, as for python -m rbf_lite.cifar")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--subset", type=int, default=None, help="time an epoch of this many images")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=8, help="epochs' worth of timed steps per head")
    parser.add_argument("--chunk-steps", type=int, default=10, help="steps per turn when the heads alternate")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args(argv)

    configs = {loss: Config(loss=loss, data=args.data, device=args.device, batch_size=args.batch_size,
                            width=args.width, subset=args.subset, compile=args.compile,
                            epochs=args.warmup_epochs + args.repeats + 1, ood="", out="unused")
               for loss in ("cce", "halo")}
    results = time_epochs(configs, args.warmup_epochs, args.repeats, args.chunk_steps)
    for loss, result in results.items():
        print(f"{loss}: {result['images_per_s']:.0f} images/s (median turn {result['median_turn_images_per_s']:.0f}), "
              f"epoch {result['epoch_seconds']:.2f} s")
    overhead = results["cce"]["images_per_s"] / results["halo"]["images_per_s"] - 1
    overhead_median = results["cce"]["median_turn_images_per_s"] / results["halo"]["median_turn_images_per_s"] - 1
    print(f"HALO costs {100 * overhead:+.2f}% per image relative to cce (median turn: {100 * overhead_median:+.2f}%)")
    report = {**environment(resolve_device(args.device)), "config": vars(args),
              "settings": dataclasses.asdict(configs["halo"]) | {"loss": "cce / halo"},
              "results": results, "halo_overhead": overhead, "halo_overhead_median_turn": overhead_median}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
