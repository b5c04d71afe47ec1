import triton
import triton.language as tl

from viditq.kernels.attention import _p_in_key_order  # V's keys are stored in P·V order (session 19)


@triton.jit
def _attn_ws_kernel(Q8, K8, V, QScale, KScale, VScale, Out, stride_ob, stride_oh, stride_on, stride_od,
                    H, N_Q, N_KV, N_UNMASKED, D, NQ_PAD, NKV_PAD,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    q_desc = tl.make_tensor_descriptor(Q8 + pid_bh * NQ_PAD * HEAD_D, shape=[NQ_PAD, HEAD_D], strides=[HEAD_D, 1],
                                       block_shape=[BLOCK_M, HEAD_D])
    k_desc = tl.make_tensor_descriptor(K8 + pid_bh * NKV_PAD * HEAD_D, shape=[NKV_PAD, HEAD_D], strides=[HEAD_D, 1],
                                       block_shape=[BLOCK_N, HEAD_D])
    v_desc = tl.make_tensor_descriptor(V + pid_bh * HEAD_D * NKV_PAD, shape=[HEAD_D, NKV_PAD], strides=[NKV_PAD, 1],
                                       block_shape=[HEAD_D, BLOCK_N])
    q = q_desc.load([pid_m * BLOCK_M, 0])
    q_scale = tl.load(QScale + pid_bh * (NQ_PAD // BLOCK_M) + pid_m)
    k_scales = KScale + pid_bh * (NKV_PAD // BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    n_blocks = N_UNMASKED // BLOCK_N
    for j in tl.range(0, n_blocks, warp_specialize=WS):
        k = k_desc.load([j * BLOCK_N, 0])
        qk = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        qk_scale = q_scale * tl.load(k_scales + j)
        m_new = tl.maximum(m_i, tl.max(qk, axis=1).to(tl.float32) * qk_scale)
        p = tl.math.exp2(qk.to(tl.float32) * qk_scale - (m_new - 8.807354922057604)[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        v = v_desc.load([0, j * BLOCK_N])
        pv = tl.dot(_p_in_key_order(p.to(tl.float8e4nv), BLOCK_N), tl.trans(v))
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    out = out * tl.load(VScale + pid_bh * HEAD_D + offs_d)[None, :]
    b = pid_bh // H
    h = pid_bh % H
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < N_Q)[:, None] & (offs_d < D)[None, :])
