"""Euler ancestral with fewer steps: what its PSNR against the full-step run measures.

    python benchmarks/ancestral_noise.py [--model weights/digits-cond] [--steps 30] [--fewer 5 9 14 18 23]

An ancestral sampler adds fresh noise at every step, so a run with fewer steps follows another
noise path than the full-step run even from the same starting noise. Three ways to give it noise:

- per step index: step i takes the i-th draw of a generator seeded like the full run's (what
  `minidiff bench frontier` does). A k-step run's step i sits at another noise level than the
  full run's step i, so its noise has nothing to do with the full run's there.
- per noise level: one Brownian path W(u), u = sigma^2, fixed on the grid of training timesteps;
  a step from sigma_i to sigma_{i+1} takes the normalised increment (W(u_i) - W(u_{i+1})) /
  sqrt(u_i - u_{i+1}), still a standard normal draw. Runs with any step count then inject the same
  noise over the same stretch of noise levels (k-diffusion's Brownian-tree idea, on a fixed grid).
- the floor: the full-step run with an unrelated noise path (another seed), same starting noise.
  PSNR near it means the comparison measures the noise path, not the steps.

Prints PSNR (mean over images) against the full-step run and the toy classifier's accuracy.
"""
import argparse

import numpy as np
import torch

from minidiff import load, metrics
from minidiff.samplers import sigma_schedule
from minidiff.schedules import NoiseSchedule


class BrownianNoise:
    """A noise source for `sample_euler_a` (pass it as `generator`) indexed by noise level, not step."""

    def __init__(self, config, steps: int, shape, seed: int):
        alphas_cumprod = NoiseSchedule.from_config(config).alphas_cumprod.double()
        u = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - alphas_cumprod) / alphas_cumprod])  # sigma^2
        g = torch.Generator().manual_seed(seed)
        steps_w = torch.randn((len(u) - 1, *shape), generator=g, dtype=torch.float64)
        increments = steps_w * (u[1:] - u[:-1]).sqrt().view(-1, *[1] * len(shape))
        self.w = torch.cat([torch.zeros(1, *shape, dtype=torch.float64), increments.cumsum(0)])  # W at each u
        self.u = u
        _, timesteps = sigma_schedule(config, steps)
        t = timesteps.double()
        if not torch.equal(t, t.round()):
            raise ValueError("this noise source needs integer timesteps (the 'leading' or 'trailing' spacing)")
        self.grid = [int(v) + 1 for v in t] + [0]  # grid index of each sigma_i; sigma = 0 at index 0
        self.step = 0

    def like(self, x):
        a, b = self.grid[self.step], self.grid[self.step + 1]
        self.step += 1
        z = (self.w[a] - self.w[b]) / (self.u[a] - self.u[b]).sqrt()
        return z.to(x.device, x.dtype)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="weights/digits-cond")
    p.add_argument("--classifier", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--fewer", type=int, nargs="+", default=[5, 9, 14, 18, 23])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = load(args.model)
    classifier = metrics.toy_classifier(pipe, args.model, args.classifier)
    labels = pipe.default_labels(args.batch)
    noise = pipe.initial_noise(args.batch, generator=torch.Generator().manual_seed(args.seed))
    shape = tuple(noise.shape)

    def run(steps, generator):
        return pipe.generate(steps=steps, sampler="euler_a", noise=noise, class_labels=labels, generator=generator,
                             progress=False)

    def accuracy(images):
        return float((classifier(images) == torch.as_tensor(labels)).float().mean())

    by_index = run(args.steps, torch.Generator().manual_seed(args.seed))
    by_level = run(args.steps, BrownianNoise(pipe.scheduler, args.steps, shape, args.seed))
    floors = [metrics.psnr(run(args.steps, torch.Generator().manual_seed(s)), by_index, per_image=True)
              for s in (args.seed + 100, args.seed + 200)]
    print(f"euler_a, {args.steps} steps, batch {args.batch}, seed {args.seed}: full-step accuracy "
          f"{accuracy(by_index):.3f} (per step index), {accuracy(by_level):.3f} (per noise level)")
    print(f"floor: the full-step run with another noise path: PSNR {np.mean(floors):.2f} dB "
          f"(seeds {args.seed + 100}, {args.seed + 200}: {floors[0]:.2f}, {floors[1]:.2f})")
    print("| steps | MACs | PSNR, noise per step index | PSNR, noise per noise level | accuracy (index / level) |")
    print("|---|---|---|---|---|")
    for k in args.fewer:
        index = run(k, torch.Generator().manual_seed(args.seed))
        level = run(k, BrownianNoise(pipe.scheduler, k, shape, args.seed))
        print(f"| {k} | {k / args.steps:.0%} | {metrics.psnr(index, by_index, per_image=True):.2f} | "
              f"{metrics.psnr(level, by_level, per_image=True):.2f} | {accuracy(index):.3f} / {accuracy(level):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
