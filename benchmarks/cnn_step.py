"""One training step of a small CNN with torch's BatchNorm2d vs fastbn's, on CPU,
eager and under torch.compile; and one inference step of the same CNN with its batch
norms folded into the convolutions (``fastbn.torch.fold``) vs unfolded.

    python benchmarks/cnn_step.py [--threads 2] [--steps 20] [--batch 64] [--no-compile]
                                  [--no-train | --no-inference]

conv-BN-ReLU x2 + linear (the model of tests/test_interop.py, wider), same
seed, same data; steps interleaved between the models (torch BN and fastbn BN,
and fastbn BN fused with its ReLU by ``convert(fuse_relu=True)``, eager and
``torch.compile(fullgraph=True)``); prints the median and p90 step time of each,
the ratios, and the fastbn backend that served. Compilation (inductor, about a
minute per model here) happens in the warm-up step and is not timed.

The inference part runs the models in eval mode under ``torch.no_grad()``: torch
BN, fastbn BN and the folded model (the same for both, conv-ReLU x2 + linear),
eager and compiled; forwards interleaved, median and p90 of each, and the ratios
unfolded / folded.
"""
import argparse
import copy
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


def _p90(values):
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def _interleaved(calls, repeats):
    """Seconds of each call, ``repeats`` rounds interleaved after one warm-up round."""
    for call in calls.values():
        call()
    times = {k: [] for k in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return times


def inference(args, x):
    """Eval-mode forward of the unfolded models vs the folded one; prints the figures."""
    models = {"torch BN": make_model(torch.nn.BatchNorm2d, args.width).eval(),
              "fastbn BN": make_model(fastbn.torch.BatchNorm2d, args.width).eval()}
    for model in models.values():  # running statistics as a trained model would have
        g = torch.Generator().manual_seed(2)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    models["folded"] = fastbn.torch.fold(copy.deepcopy(models["fastbn BN"]))
    if not args.no_compile:
        models.update({f"{k}, compiled": torch.compile(m, fullgraph=True,
                                                       backend=args.compile_backend)
                       for k, m in list(models.items())})
    with torch.no_grad():
        reference = models["fastbn BN"](x)
        worst = max(float((m(x) - reference).abs().max()) for m in models.values())
        times = _interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.steps)
    _report(f"CNN inference step (eval, no_grad), batch {args.batch}x3x{args.size}x{args.size}, "
            f"width {args.width}, {args.threads} threads, {args.steps} interleaved repeats; "
            f"largest output difference from the unfolded model: {worst:.2e}",
            times, [("torch BN", "folded"), ("fastbn BN", "folded")])


def _report(title, times, ratios):
    """The median and p90 of each entry of ``times``, then the ratios of medians
    ``(slower, faster)``, eager and compiled."""
    medians = {k: statistics.median(v) for k, v in times.items()}
    print(title)
    for name, v in times.items():
        print(f"  {name:<30} median {medians[name] * 1e3:8.2f} ms   p90 {_p90(v) * 1e3:8.2f} ms")
    for suffix in ("", ", compiled"):
        for slow, fast in ratios:
            if slow + suffix in medians and fast + suffix in medians:
                ratio = medians[slow + suffix] / medians[fast + suffix]
                print(f"  {slow} / {fast} step time{suffix or ', eager'}: {ratio:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--no-compile", action="store_true", help="eager models only")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--no-train", action="store_true", help="the inference part only")
    parser.add_argument("--no-inference", action="store_true", help="the training part only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fastbn.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    t = torch.randint(0, 10, (args.batch,), generator=g)
    if not args.no_inference:
        inference(args, x)
    if not args.no_train:
        train(args, x, t)


def train(args, x, t):
    """Training steps of torch BN vs fastbn BN models; prints the figures."""
    def fused(width):  # BN and ReLU in one pass: convert(fuse_relu=True)
        return fastbn.torch.convert(make_model(torch.nn.BatchNorm2d, width), fuse_relu=True)

    builders = (("torch BN", lambda w: make_model(torch.nn.BatchNorm2d, w)),
                ("fastbn BN", lambda w: make_model(fastbn.torch.BatchNorm2d, w)),
                ("fastbn BN+ReLU fused", fused))
    models = {k: build(args.width) for k, build in builders}
    if not args.no_compile:
        models.update({f"{k}, compiled": build(args.width) for k, build in builders})
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.01) for k, m in models.items()}
    forward = {k: torch.compile(m, fullgraph=True, backend=args.compile_backend)
               if k.endswith("compiled") else m for k, m in models.items()}

    def step(name):
        opt = optimizers[name]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(forward[name](x), t)
        loss.backward()
        opt.step()
        return loss.item()

    times = _interleaved({name: (lambda name=name: step(name)) for name in models}, args.steps)
    _report(f"CNN training step, batch {args.batch}x3x{args.size}x{args.size}, width "
            f"{args.width}, {args.threads} threads, {args.steps} interleaved steps (fastbn "
            f"backend: {fastbn.last_backend()})", times,
            [("torch BN", "fastbn BN"), ("torch BN", "fastbn BN+ReLU fused")])


if __name__ == "__main__":
    main()
