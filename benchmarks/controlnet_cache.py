"""ControlNet under caching: the rule (a shallow step runs the ControlNet only up to the cut) against
running the whole ControlNet at every step, as a patched pipeline does (DeepCache's helper on
diffusers' StableDiffusionControlNetPipeline calls the ControlNet before the U-Net at every step).

    python benchmarks/controlnet_cache.py [--size 32] [--steps 10] [--threads 1] [--repeats 1]

Speed: SD1.5's U-Net and a ControlNet of its encoder with random weights (speed does not depend on
them), latents size x size, batch 2 (guidance). Per-step times are measured (median of --repeats
after a warm-up) and a DDIM run of --steps steps at interval N is composed from them:
ceil(steps / N) full steps, the rest shallow. MACs are counted by torch's FLOP counter.

Fidelity: both ways give the same output (the residuals past the cut are never read on a shallow
step; checked here), so one PSNR per setting: the cached run against the uncached one, on a tiny
SD-shaped model with random weights (no trained ControlNet ships with minidiff), in dB over the
uncached latents' range.

Measured (1 thread of a shared 2-core CPU, --size 32, DDIM 10, batch 2): a full step (U-Net + whole
ControlNet) 17.1 s, 227 GMACs; the ControlNet 4.9 s, 55.6 GMACs of it. A shallow step's ControlNet
costs 0.24 GMACs at branch 0 and 16.8 at branch 2 (0.4% and 30% of the whole). Ten steps: uncached
171 s; whole ControlNet / rule 101 / 71 s at branch 0 N=3 (1.41x), 77 / 38 s at N=5 (2.03x),
104 / 76 s at branch 2 N=3 (1.36x), 81 / 44 s at N=5 (1.83x). PSNR vs uncached 42-54 dB, the rule
and the whole ControlNet bit-identical.
"""
from __future__ import annotations

import argparse
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from minidiff.controlnet import ControlNet, ControlNetConfig, Controlled
from minidiff.convert.architectures import architecture
from minidiff.convert.sd15 import sd_scheduler
from minidiff.samplers import sample_ddim
from minidiff.unet import UNet, UNetConfig
from sd15_speed import timed  # median of repeats after a warm-up (this folder is on the path when run)

BATCH = 2  # guidance: [uncond, cond]


def macs(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def whole_controlnet(net, x, t, cond: Controlled):
    """The alternative: every residual of the ControlNet, as a pipeline computes them before the U-Net."""
    return net(x, t, cond.cond, cond.hints[0], cond.scales[0])


def cut_controlnet(net, x, t, cond: Controlled, branch: int):
    """The rule on a shallow step: the ControlNet's input_blocks[:branch + 1] only."""
    steering = cond.start(x.contiguous(memory_format=torch.channels_last), torch.full((x.shape[0],), t))
    return steering.steer([0] * (branch + 1))


@torch.inference_mode()
def speed(size: int, steps: int, branches, intervals, repeats: int):
    cfg = architecture("sd15")
    unet, net = UNet(cfg).eval(), ControlNet(ControlNetConfig(cfg)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 4, size, size, generator=g)
    context = torch.randn(BATCH, 77, cfg.context_dim, generator=g)
    hint = net.embed_hint(torch.rand(1, 3, 8 * size, 8 * size, generator=g)).expand(BATCH, -1, -1, -1)
    cond = Controlled(context, (net,), (hint,), (1.0,))
    t = 500
    full = timed(lambda: unet.forward_full(x, t, cond, branch=0), repeats)
    cn_whole = timed(lambda: whole_controlnet(net, x, t, cond), repeats)
    mac_full = macs(lambda: unet.forward_full(x, t, cond, branch=0))
    mac_cn_whole = macs(lambda: whole_controlnet(net, x, t, cond))
    print(f"SD1.5 U-Net + ControlNet, random weights, latents {size}x{size}, batch {BATCH} (guidance), "
          f"{torch.get_num_threads()} thread(s)")
    print(f"full step (U-Net + whole ControlNet): {full:.2f} s, {mac_full / 1e9:.1f} GMACs; "
          f"the ControlNet alone {cn_whole:.2f} s, {mac_cn_whole / 1e9:.1f} GMACs")
    print()
    print("branch  N   ControlNet per shallow step: cut / whole (s, GMACs)   run of "
          f"{steps} DDIM steps: uncached / whole / rule (s)   rule vs whole   CN time saved")
    for branch in branches:
        _, cache = unet.forward_full(x, t, cond, branch=branch)
        shallow_rule = timed(lambda: unet.forward_shallow(x, t, cond, cache=cache), repeats)
        cn_cut = timed(lambda: cut_controlnet(net, x, t, cond, branch), repeats)
        mac_cn_cut = macs(lambda: cut_controlnet(net, x, t, cond, branch))
        shallow_whole = shallow_rule - cn_cut + cn_whole  # the same U-Net work, the whole ControlNet
        for n in intervals:
            fulls = math.ceil(steps / n)
            shallows = steps - fulls
            uncached = steps * full
            rule = fulls * full + shallows * shallow_rule
            whole = fulls * full + shallows * shallow_whole
            cn_rule_time = fulls * cn_whole + shallows * cn_cut
            print(f"{branch:>6} {n:>2}   {cn_cut:6.2f} / {cn_whole:5.2f} s, {mac_cn_cut / 1e9:6.2f} / "
                  f"{mac_cn_whole / 1e9:6.1f} GMACs          {uncached:6.1f} / {whole:6.1f} / {rule:6.1f}"
                  f"            {whole / rule:5.2f}x        {1 - cn_rule_time / (steps * cn_whole):5.1%}")


def tiny_models(seed=0):
    cfg = UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                     attention_levels=(0, 1), attention_type="transformer", num_heads=2, context_dim=32,
                     norm_eps=1e-5, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0)
    torch.manual_seed(seed)
    unet, net = UNet(cfg).eval(), ControlNet(ControlNetConfig(cfg, hint_block_channels=(16, 32))).eval()
    return unet, net


@torch.inference_mode()
def fidelity(branches, intervals, steps: int):
    unet, net = tiny_models()
    scheduler = sd_scheduler()
    unet.num_train_timesteps = scheduler.num_train_timesteps
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    hint = net.embed_hint(torch.rand(1, 3, 32, 32, generator=g)).expand(2, -1, -1, -1)
    cond = Controlled(context, (net,), (hint,), (1.0,))

    def run(n, branch, whole):
        calls = {"i": 0, "cache": None}

        def model(x, t):
            xx = torch.cat([x, x])
            if calls["i"] % n == 0:
                out, calls["cache"] = unet.forward_full(xx, t, cond, branch=branch)
            elif whole:  # every residual computed, the shallow step reading the first branch + 1
                residuals, _ = whole_controlnet(net, xx, t, cond)
                state = unet.forward_cut(xx, t, context, branch=branch)
                state.skips = [s + r for s, r in zip(state.skips, residuals)]
                out = unet.forward_from_cache(state, calls["cache"].hidden)
            else:
                out = unet.forward_shallow(xx, t, cond, cache=calls["cache"])
            calls["i"] += 1
            uncond, cond_ = out.chunk(2)
            return uncond + 7.5 * (cond_ - uncond)

        return sample_ddim(model, noise.clone(), scheduler, steps, progress=False)

    reference = run(1, 0, False)
    span = float(reference.max() - reference.min())
    print()
    print(f"fidelity, tiny SD-shaped U-Net + ControlNet (random weights), DDIM {steps}, guidance 7.5: "
          "PSNR of the cached run vs uncached (dB over the uncached latents' range)")
    for branch in branches:
        for n in intervals:
            rule, whole = run(n, branch, False), run(n, branch, True)
            mse = float((rule - reference).square().mean())
            same = "identical" if torch.equal(rule, whole) else f"max diff {float((rule - whole).abs().max()):.1e}"
            print(f"  branch {branch} N={n}: {20 * math.log10(span) - 10 * math.log10(mse):5.1f} dB; rule vs whole "
                  f"ControlNet: {same}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="latent size (8x smaller than the image)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--branches", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.skip_speed:
        speed(args.size, args.steps, args.branches, args.intervals, args.repeats)
    fidelity(args.branches, args.intervals, args.steps)


if __name__ == "__main__":
    main()
