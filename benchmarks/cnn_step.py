"""One training step of a small CNN with torch's BatchNorm2d vs fastbn's, on CPU,
eager and under torch.compile.

    python benchmarks/cnn_step.py [--threads 2] [--steps 20] [--batch 64] [--no-compile]

conv-BN-ReLU x2 + linear (the model of tests/test_interop.py, wider), same
seed, same data; steps interleaved between the models (torch BN and fastbn BN,
eager and ``torch.compile(fullgraph=True)``); prints the median step time of each,
the ratios, and the fastbn backend that served. Compilation (inductor, about a
minute per model here) happens in the warm-up step and is not timed.
"""
import argparse
import statistics
import time

import torch

import fastbn
import fastbn.torch


def make_model(bn2d, width):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1), bn2d(width), torch.nn.ReLU(),
        torch.nn.Conv2d(width, width, 3, padding=1), bn2d(width), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(width * 16, 10))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--no-compile", action="store_true", help="eager models only")
    parser.add_argument("--compile-backend", default="inductor")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    t = torch.randint(0, 10, (args.batch,), generator=g)
    models = {"torch BN": make_model(torch.nn.BatchNorm2d, args.width),
              "fastbn BN": make_model(fastbn.torch.BatchNorm2d, args.width)}
    if not args.no_compile:
        models.update({f"{k}, compiled": make_model(bn, args.width) for k, bn in (
            ("torch BN", torch.nn.BatchNorm2d), ("fastbn BN", fastbn.torch.BatchNorm2d))})
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    forward = {k: torch.compile(m, fullgraph=True, backend=args.compile_backend)
               if k.endswith("compiled") else m for k, m in models.items()}
    times = {k: [] for k in models}

    def step(name):
        opt = optimizers[name]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward[name](x), t)
        loss.backward()
        opt.step()
        return loss.item()

    for name in models:  # warm-up
        step(name)
    for _ in range(args.steps):
        for name in models:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    served = fastbn.last_backend()
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(f"CNN training step, batch {args.batch}x3x{args.size}x{args.size}, width "
          f"{args.width}, {args.threads} threads, median of {args.steps} interleaved steps "
          f"(fastbn backend: {served})")
    for name, m in medians.items():
        print(f"  {name:<20} {m * 1e3:8.2f} ms")
    for suffix in ("", ", compiled"):
        if f"torch BN{suffix}" in medians:
            ratio = medians[f"torch BN{suffix}"] / medians[f"fastbn BN{suffix}"]
            print(f"  torch / fastbn step time{suffix or ', eager'}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
