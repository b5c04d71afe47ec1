"""Weight bytes of a quantized PixArt-α 1024 / CogVideoX-2B on the CPU (random bf16 weights, the bench_e2e
models; the byte counts do not depend on the device or on the calibration input, so it is a small latent here).

    python benchmarks/weight_bytes.py pixart w4a8-fp8 4 > weights.json   # MODEL PRESET CONDITIONING_BITS (0: off)

Prints JSON: held (parameters and every buffer, as on the GPU, including the sin-cos position tables rebuilt at
load) and state (the state dict: what a checkpoint stores) MiB and their ratios to bf16.
"""
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench_e2e  # noqa: E402
import viditq  # noqa: E402

MiB = 2**20


def main():
    name, preset, bits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model, kw = bench_e2e.build_model(name, "cpu", tiny=False)
    bf16 = bench_e2e.module_bytes(model), bench_e2e.state_bytes(model)
    x = kw["hidden_states"]
    kw["hidden_states"] = (x[:, :, :16, :16] if name == "pixart" else x[:, :2, :, :8, :8]).contiguous()
    t0 = time.time()
    viditq.quantize(model, dataclasses.replace(viditq.PRESETS[preset], conditioning_bits=bits or None), calib=[kw])
    q = bench_e2e.module_bytes(model), bench_e2e.state_bytes(model)
    print(json.dumps(dict(model=name, preset=preset, conditioning_bits=bits or None, bf16_held_mib=bf16[0] / MiB,
                          bf16_state_mib=bf16[1] / MiB, held_mib=q[0] / MiB, state_mib=q[1] / MiB,
                          held_ratio=bf16[0] / q[0], state_ratio=bf16[1] / q[1], quantize_s=time.time() - t0)))


if __name__ == "__main__":
    main()
