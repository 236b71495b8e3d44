"""`benchmarks/packed_softmax.py` under other launch settings of the Triton flash kernel, one run per variant.

A variant is "shipped" (the module's tables as they are) or ';'-separated ``kernel=BM,BN,num_warps,num_stages``
with kernel one of fwd, dkdv, dq (16-bit settings: ``FWD_CONFIG`` / ``BWD_CONFIG`` of
``longscan.kernels.softmax_attention.triton_flash``). Everything after ``--`` goes to packed_softmax; each
variant prints its table. The module's settings are restored after each variant; no file changes.

    PYTHONPATH=. python benchmarks/tuning/ring_settings.py --variants shipped "dkdv=64,32,4,2" \
        "fwd=128,64,8,2;dq=64,64,4,3" -- --total 65536 --doc-len 2048 --heads 32 --kv-heads 8 --head-dim 128 --world 8
"""
from __future__ import annotations

import argparse
import sys

from benchmarks import packed_softmax
from longscan.kernels.softmax_attention import triton_flash as tf

KERNELS = ("fwd", "dkdv", "dq")


def parse_variant(text: str) -> dict[str, dict]:
    """"shipped" -> {}; "dkdv=64,32,4,2;fwd=..." -> {kernel: settings}; ValueError naming what is wrong."""
    if text == "shipped":
        return {}
    out = {}
    for part in text.split(";"):
        kernel, _, values = part.partition("=")
        nums = values.split(",")
        if kernel not in KERNELS or len(nums) != 4 or not all(n.isdigit() for n in nums):
            raise ValueError(f"a variant is 'shipped' or kernel=BM,BN,num_warps,num_stages with kernel in "
                             f"{KERNELS}, joined by ';'; got {part!r} in {text!r}")
        bm, bn, warps, stages = map(int, nums)
        out[kernel] = dict(BM=bm, BN=bn, num_warps=warps, num_stages=stages)
    return out


def apply(settings: dict[str, dict]) -> dict:
    """Set the module's 16-bit tables -> what they held (for :func:`restore`)."""
    saved = dict(fwd=dict(tf.FWD_CONFIG), dkdv=dict(tf.BWD_CONFIG["dkdv"]), dq=dict(tf.BWD_CONFIG["dq"]))
    for kernel, cfg in settings.items():
        table = tf.FWD_CONFIG if kernel == "fwd" else tf.BWD_CONFIG[kernel]
        table.clear()
        table.update(cfg)
    return saved


def restore(saved: dict) -> None:
    apply(saved)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["shipped"])
    a = p.parse_args(ours)
    variants = [(v, parse_variant(v)) for v in a.variants]      # every variant checked before the first runs
    for i, (text, settings) in enumerate(variants):
        saved = apply(settings)
        try:
            print(f"### {text}: fwd {tf.FWD_CONFIG} dkdv {tf.BWD_CONFIG['dkdv']} dq {tf.BWD_CONFIG['dq']}", flush=True)
            packed_softmax.main(rest + ["--json", f"ring_settings_{i}.json"])
        finally:
            restore(saved)


if __name__ == "__main__":
    main()
