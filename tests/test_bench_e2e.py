"""benchmarks/bench_e2e.py's byte counts: what the weights row of the end-to-end table reports."""
import torch
from torch.testing._internal.two_tensor import TwoTensor


def test_weight_bytes_count_the_inner_tensors_of_wrapper_subclasses(benchmark_script):
    """A weight held as a wrapper subclass (torchao's fp8 tensors report the bf16 dtype they stand for) counts the
    bytes of the tensors it holds: session 21's torchao row reported the bf16 size, 1232 MB for 664 MB held."""
    bench_e2e = benchmark_script("bench_e2e")
    model = torch.nn.Linear(64, 32, dtype=torch.bfloat16)
    plain = 64 * 32 * 2 + 32 * 2
    assert bench_e2e.module_bytes(model) == plain
    assert bench_e2e.state_bytes(model) == plain
    codes, scales = torch.zeros(32, 64, dtype=torch.float8_e4m3fn), torch.ones(32, 64, dtype=torch.float8_e4m3fn)
    model.weight = torch.nn.Parameter(TwoTensor(codes, scales), requires_grad=False)
    assert model.weight.element_size() == 1  # (TwoTensor reports its inner dtype; the count must not use it)
    held = 2 * 32 * 64 + 32 * 2
    assert bench_e2e.module_bytes(model) == held
    assert bench_e2e.state_bytes(model) == held


def test_kernel_profile_categories(benchmark_script):
    """The profile's categories of the kernels a quantized CogVideoX forward ran on the H100 (session 25's names):
    the 8-bit attention's kernel and preparation, Inductor's q/k norms (named after the attention they feed) as
    norms, the residual passes as elementwise."""
    category = benchmark_script("bench_e2e").kernel_category
    assert {name: category(name) for name in (
        "_attn_fwd_kernel", "_attn_stats_kernel", "_attn_stats_finish_kernel", "_quantize_blocks_kernel",
        "_quantize_v_fp8_kernel", "_quant_gemm_tma_kernel", "_gemm_ws_kernel", "_act_quant_plain_kernel",
        "_ln_modulate_kernel", "triton_per_fused_native_layer_norm_quantized_attention_transpose_view_3",
        "triton_poi_fused_add_mul_slice_split_split_with_sizes_unsqueeze_view_6",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0",
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", "Memset (Device)")} == {
        "_attn_fwd_kernel": "attention", "_attn_stats_kernel": "attention_prep",
        "_attn_stats_finish_kernel": "attention_prep", "_quantize_blocks_kernel": "attention_prep",
        "_quantize_v_fp8_kernel": "attention_prep", "_quant_gemm_tma_kernel": "gemm", "_gemm_ws_kernel": "gemm",
        "_act_quant_plain_kernel": "act_quant", "_ln_modulate_kernel": "norm",
        "triton_per_fused_native_layer_norm_quantized_attention_transpose_view_3": "norm",
        "triton_poi_fused_add_mul_slice_split_split_with_sizes_unsqueeze_view_6": "elementwise",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_cga1x1x1_kernel0_0":
            "attention",
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN": "gemm", "Memset (Device)": "other"}


def test_wan_builds_and_its_quantized_forward_matches_bf16(benchmark_script):
    """The Wan2.1 model of the end-to-end bench (tiny config on the CPU): built, quantized with fp8 attention
    routed, and its output within W8A8-fp8 error of the bf16 forward (the smoke test the GPU run relies on)."""
    bench_e2e = benchmark_script("bench_e2e")
    result = bench_e2e.run_one("wan", "w8a8_fp8_attn", iters=1, tiny=True)
    assert result["quantized_layers"] == 20  # 2 blocks x (self q, k, v, o + cross q, k, v, o + FF up, down)
    assert result["attention"]["modules"] == 4  # self- and cross-attention of both blocks
    assert 0 < result["rel_err_vs_bf16"] < 0.05
