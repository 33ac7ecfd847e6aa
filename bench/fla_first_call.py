"""How long fla's retention kernel takes the first time on this machine (Triton compiles and
autotunes every kernel of chunk_simple_gla on first use), and after that.

    TRITON_PRINT_AUTOTUNING=1 python bench/fla_first_call.py [--t 2048] [--dk 256] [--dv 512]

Prints ``name=value`` lines: import times, the first forward and backward (compile + autotune),
and the same call again (cached), all in seconds, bf16 on the first CUDA device.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--t", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dk", type=int, default=256)
    ap.add_argument("--dv", type=int, default=512)
    args = ap.parse_args()
    t0 = time.perf_counter()
    import torch

    print(f"import_torch_s={time.perf_counter() - t0:.2f}", flush=True)
    t0 = time.perf_counter()
    from fla.ops.simple_gla import chunk_simple_gla

    print(f"import_fla_s={time.perf_counter() - t0:.2f}", flush=True)
    from megaret.ops.decay import retnet_log_decay

    dev = torch.device("cuda")
    b, t, h = 1, args.t, args.heads
    q = torch.randn(b, t, h, args.dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, t, h, args.dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, t, h, args.dv, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = retnet_log_decay(2 * h, head_offset=h, num_local_heads=h).to(dev)  # TP rank 1 of 2

    def call(tag: str) -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o, s = chunk_simple_gla(q, k, v, g_gamma=g, scale=1.0, output_final_state=True)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        (o.float().square().mean() + s.square().mean()).backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"{tag}_forward_s={t1 - t0:.3f}\n{tag}_backward_s={t2 - t1:.3f}", flush=True)

    call("first")
    call("second")


if __name__ == "__main__":
    main()
