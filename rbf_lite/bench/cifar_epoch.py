"""Time CIFAR-10 training epochs with the linear (cce) and the HALO head: images/s and wall time.

    python -m rbf_lite.bench.cifar_epoch --data ../shared/data --out bench/cifar_epoch.json

Both heads get a fresh `Trainer` (same seed, same backbone) and a warm-up epoch (cuDNN autotuning,
torch.compile when asked); then their timed epochs alternate (`time_epochs`). `Trainer.train_epoch`
ends by reading the mean loss back from the device, so the timing includes all queued GPU work.
HALO's extra cost is its head: on the GPU one fused Triton kernel (`rbf_lite.kernels.halo_head`)
against the linear layer and cross-entropy.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics

from ..cifar import Config, Trainer, resolve_device
from ..runs import environment, write_json


def time_epochs(configs: dict[str, Config], warmup_epochs: int, repeats: int) -> dict:
    """Warm every head up, then time `repeats` epochs of each, taking turns (A B B A A B ...).

    A training step is host-bound and the host's speed drifts by ~10% over a minute here; timed
    one after the other, the second head would inherit a different machine. Taking turns spreads
    the drift over both; the median epoch of each is reported, and the fastest one too.
    """
    trainers = {name: Trainer(cfg) for name, cfg in configs.items()}
    for trainer in trainers.values():
        trainer.calibrate()
        for _ in range(warmup_epochs):  # cuDNN tunes the short last batch in the first epoch
            trainer.train_epoch()
    epochs = {name: [] for name in trainers}
    for turn in range(repeats):
        for name in (list(trainers) if turn % 2 == 0 else list(trainers)[::-1]):
            epochs[name].append(trainers[name].train_epoch())
    results = {}
    for name, stats in epochs.items():
        seconds = [s["seconds"] for s in stats]
        median = statistics.median(seconds)
        results[name] = {"images_per_s": stats[0]["images"] / median, "epoch_seconds": median,
                         "fastest_epoch_seconds": min(seconds), "images": stats[0]["images"],
                         "all_epoch_seconds": seconds, "train_loss": stats[-1]["train_loss"]}
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
    parser.add_argument("--repeats", type=int, default=8, help="timed epochs per head (median reported)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    args = parser.parse_args(argv)

    configs = {loss: Config(loss=loss, data=args.data, device=args.device, batch_size=args.batch_size,
                            width=args.width, subset=args.subset, compile=args.compile,
                            epochs=args.warmup_epochs + args.repeats, ood="", out="unused")
               for loss in ("cce", "halo")}
    results = time_epochs(configs, args.warmup_epochs, args.repeats)
    for loss, result in results.items():
        print(f"{loss}: {result['images_per_s']:.0f} images/s, median epoch {result['epoch_seconds']:.2f} s "
              f"(fastest {result['fastest_epoch_seconds']:.2f} s)")
    overhead = results["halo"]["epoch_seconds"] / results["cce"]["epoch_seconds"] - 1
    overhead_fastest = results["halo"]["fastest_epoch_seconds"] / results["cce"]["fastest_epoch_seconds"] - 1
    print(f"HALO costs {100 * overhead:+.2f}% per epoch relative to cce (median; fastest epochs: "
          f"{100 * overhead_fastest:+.2f}%)")
    report = {**environment(resolve_device(args.device)), "config": vars(args),
              "settings": dataclasses.asdict(configs["halo"]) | {"loss": "cce / halo"},
              "results": results, "halo_overhead": overhead, "halo_overhead_fastest": overhead_fastest}
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
