"""Smoke test of benchmarks/eval_attention_embedded.py: its core function at 2 prompts x 2 steps gives finite metrics,
routes attention through the 8-bit path exactly in the 8-bit rows, and is paired (a repeated float run is identical
to the reference). T2V (CogVideoX) with the cheapest 8-bit row; the W8A8 rows on T2I (PixArt, 8-bit path forced
with min_kv_tokens=0), where the reference attention costs little."""
import math

import pytest


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("eval_attention_embedded")


@pytest.fixture(scope="module")
def probe():
    from viditq.metrics.probe import load_probe

    return load_probe()


@pytest.fixture(scope="module")
def t2v(script, probe):
    return script.evaluate_attention("t2v", n=2, steps=2, seeds=(0, 1000), variants=("fp", "fp + int8 attention"),
                                     repeat_fp=True, probe=probe, log=lambda *_: None)


@pytest.fixture(scope="module")
def t2i(script, probe):
    variants = ("fp", "fp + fp8 attention", "w8a8", "w8a8 + fp8 attention")
    return script.evaluate_attention("t2i", n=2, steps=2, calib_prompts=1, seeds=(0,), variants=variants,
                                     min_kv_tokens=0, probe=probe, log=lambda *_: None)


def test_rows_and_metrics_are_finite(script, t2v, t2i):
    assert list(t2v) == ["fp", script.REPEAT_ROW, "fp + int8 attention", script.NOISE_ROW]
    assert list(t2i) == ["fp", "fp + fp8 attention", "w8a8", "w8a8 + fp8 attention"]
    video = ("direction_accuracy", "speed_accuracy", "frame_consistency", "flicker")
    for rows, columns in ((t2v, video), (t2i, ())):
        for label, m in rows.items():
            for c in ("attribute_accuracy", "all_correct", "fd_probe") + columns:
                assert math.isfinite(m[c]), (label, c)
            assert 0.0 <= m["attribute_accuracy"] <= 1.0
    assert 0.0 < t2v["fp + int8 attention"]["frame_consistency"] <= 1.0
    for m in (t2v["fp + int8 attention"], t2i["fp + fp8 attention"], t2i["w8a8"], t2i["w8a8 + fp8 attention"]):
        assert 25.0 < m["psnr_vs_fp"] < 100.0 and 0.5 < m["ssim_vs_fp"] < 1.0
    assert math.isfinite(t2v["fp + int8 attention"]["flicker_vs_fp"])
    assert "psnr_vs_fp" not in t2v["fp"] and "psnr_vs_fp" not in t2v[script.NOISE_ROW]


def test_attention_calls_go_through_the_8bit_path_only_where_asked(t2v, t2i):
    # T2V: 6 blocks of full 3D attention x 2 steps (CFG branches share one batch), all above MIN_KV_TOKENS
    assert t2v["fp + int8 attention"]["attention_calls"] == {"quantized": 12, "short_kv_sdpa": 0, "fallback_sdpa": 0}
    # T2I: 6 blocks x (self + cross) x 2 steps, all forced onto the 8-bit path (256 and 32 keys, min_kv_tokens=0)
    for label in ("fp + fp8 attention", "w8a8 + fp8 attention"):
        assert t2i[label]["attention_calls"] == {"quantized": 24, "short_kv_sdpa": 0, "fallback_sdpa": 0}
    for label in ("fp", "fp (repeat)", "fp (other seeds)"):
        assert sum(t2v[label]["attention_calls"].values()) == 0, label
    for label in ("fp", "w8a8"):
        assert sum(t2i[label]["attention_calls"].values()) == 0, label
    assert t2i["w8a8 + fp8 attention"]["same_weights_as_w8a8"] is True  # only the attention differs


def test_repeated_float_run_is_identical(t2v):
    repeat = t2v["fp (repeat)"]
    assert repeat["psnr_vs_fp"] == 100.0 and repeat["ssim_vs_fp"] == pytest.approx(1.0)  # 100 dB = identical
    assert repeat["flicker_vs_fp"] == 0.0 and repeat["fd_probe"] == t2v["fp"]["fd_probe"]
