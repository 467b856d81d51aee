"""``safeattn`` command line (also ``python -m safeattn``)."""
from __future__ import annotations

import argparse
import time


def _demo(args: argparse.Namespace) -> int:
    """Show the interval op on a Gemma-3-270M-shaped decode step with a [CLS] probe row."""
    import torch
    import torch.nn.functional as F

    from . import ops, reference

    torch.manual_seed(0)
    b, hq, hkv, d, tk = args.batch, 4, 1, 256, args.keys
    q = torch.randn(b, hq, 2, d)
    k, v = torch.randn(b, hkv, tk, d), torch.randn(b, hkv, tk, d)
    qs = (2, min(tk - 1, 34))
    # Row 0: the new token sees every key. Row 1: a probe sees q_span, the last 10 keys, itself.
    iv = torch.tensor([[[0, tk], [0, 0], [0, 0]],
                       [[qs[0], qs[1]], [max(0, tk - 11), tk - 1], [tk - 1, tk]]],
                      dtype=torch.int32).expand(b, 2, 3, 2).contiguous()
    out = ops.interval_attention(q, k, v, iv)
    ref = reference.interval_attention(q.double(), k.double(), v.double(), iv)
    print(f"interval_attention q{tuple(q.shape)} k{tuple(k.shape)}: "
          f"max |out - reference| = {(out.double() - ref).abs().max():.2e}")

    def timed(fn, n=50):
        for _ in range(5):
            fn()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t) / n * 1e3

    mask = reference.interval_mask(iv, tk)[:, None]
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    ours = timed(lambda: torch.ops.safeattn.interval_attention(q, k, v, iv, None, None))
    sdpa = timed(lambda: F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask))
    print(f"token + probe rows, one call: {ours:.3f} ms; SDPA with repeat_kv + dense mask: "
          f"{sdpa:.3f} ms ({sdpa / ours:.2f}x)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .training import run_train
    return run_train(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="safeattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the interval-attention op on a decode step")
    demo.add_argument("--batch", type=int, default=1)
    demo.add_argument("--keys", type=int, default=1024, help="KV cache length")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="train the [CLS] head / model (HF Trainer)",
                           description="Joint LM + [CLS] training (safeattn.training). Runs "
                                       "unchanged under torchrun / accelerate launch.")
    from .training_args import add_train_arguments
    add_train_arguments(train)
    train.set_defaults(func=_train)
    args = parser.parse_args(argv)
    if args.command == "train":
        import sys
        args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
    return args.func(args)
