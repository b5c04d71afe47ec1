"""Tiny random-weight diffusers transformers with matching inputs, for tests, demos and benchmarks.

``tiny_model(name)`` builds a real diffusers class (PixArt-α, CogVideoX, Latte, SD3, Flux, Wan) with a small
config; ``tiny_inputs(name, model, seed)`` returns forward kwargs shaped like a CFG batch at one timestep.
``inject_outliers`` scales a few input channels of every attention/FFN block by a large gain (and divides the
consuming weights by it), reproducing the channel outliers of real DiTs without changing the float function.
"""
from __future__ import annotations

import torch
from torch import nn

MODELS = ("pixart", "cogvideox", "latte", "sd3", "flux", "wan")
HIDDEN = 64  # 2 heads x 32: every linear width is then a Hadamard-friendly power of two or 3x


def tiny_model(name: str, seed: int = 0, num_layers: int = 2) -> nn.Module:
    """A small diffusers transformer of ``name`` (MODELS) with random weights; ``num_layers`` blocks (Flux: one
    double- and one single-stream block whatever it is)."""
    import diffusers

    torch.manual_seed(seed)
    if name == "pixart":
        m = diffusers.PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=num_layers,
            cross_attention_dim=HIDDEN, caption_channels=48, sample_size=8, patch_size=2,
            norm_type="ada_norm_single", use_additional_conditions=False)
    elif name == "cogvideox":
        m = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=num_layers,
            text_embed_dim=48, time_embed_dim=32, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            max_text_seq_length=8)
    elif name == "latte":
        m = diffusers.LatteTransformer3DModel(
            num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=num_layers,
            cross_attention_dim=HIDDEN, caption_channels=48, sample_size=8, patch_size=2, video_length=3,
            norm_type="ada_norm_single")
    elif name == "sd3":
        m = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=HIDDEN, pooled_projection_dim=16,
            out_channels=4, pos_embed_max_size=16)
    elif name == "flux":
        m = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=16, axes_dims_rope=(8, 12, 12))
    elif name == "wan":
        m = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
            text_dim=48, freq_dim=32, ffn_dim=128, num_layers=num_layers, rope_max_seq_len=32)
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {MODELS}")
    return m.eval()


def tiny_inputs(name: str, seed: int = 0, batch: int = 2, text_len: int = 8) -> dict:
    """Forward kwargs for ``tiny_model(name)``: random latents and text states at a random timestep."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    text = randn(batch, text_len, 48)
    t = torch.randint(0, 1000, (1,), generator=g).repeat(batch)
    if name in ("pixart", "sd3"):
        kw = dict(hidden_states=randn(batch, 4, 8, 8), encoder_hidden_states=text, timestep=t)
        if name == "pixart":
            kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        else:
            kw["pooled_projections"] = randn(batch, 16)
        return kw
    if name == "cogvideox":
        return dict(hidden_states=randn(batch, 3, 4, 8, 8), encoder_hidden_states=text, timestep=t)
    if name == "latte":
        return dict(hidden_states=randn(batch, 4, 3, 8, 8), encoder_hidden_states=text, timestep=t,
                    enable_temporal_attentions=True)
    if name == "wan":
        return dict(hidden_states=randn(batch, 4, 3, 8, 8), encoder_hidden_states=text, timestep=t)
    if name == "flux":
        n_img = 16
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                             indexing="ij"), -1).reshape(n_img, 3)
        return dict(hidden_states=randn(batch, n_img, 16), encoder_hidden_states=text,
                    pooled_projections=randn(batch, 16), timestep=t.float() / 1000, img_ids=img_ids,
                    txt_ids=torch.zeros(text_len, 3))
    raise ValueError(f"unknown tiny model {name!r}; choose one of {MODELS}")


def calibration_set(name: str, n: int = 4, seed: int = 100) -> list[dict]:
    return [tiny_inputs(name, seed=seed + i) for i in range(n)]


def forward_output(model: nn.Module, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**kwargs)
    return (out.sample if hasattr(out, "sample") else out[0]).float()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better)."""
    reference, approx = reference.detach().float(), approx.detach().float()
    noise = (reference - approx).pow(2).mean()
    return float(10 * torch.log10(reference.float().pow(2).mean() / noise.clamp_min(1e-30)).detach())


def inject_outliers(model: nn.Module, fraction: float = 0.02, gain: float = 20.0, seed: int = 0) -> int:
    """Give a ``fraction`` of the input channels of each attention/FFN block's inputs a ``gain``x larger range.

    A forward pre-hook on the block multiplies those channels of its input hidden states; the consuming linear
    layers' weight columns are divided by ``gain`` so that the float function is unchanged. Returns the number
    of modules changed.
    """
    g = torch.Generator().manual_seed(seed)
    count = 0
    for name, module in model.named_modules():
        consumers = _outlier_consumers(name, module)
        if not consumers:
            continue
        width = consumers[0].in_features
        n_out = max(1, round(fraction * width))
        channels = torch.randperm(width, generator=g)[:n_out]
        scale = torch.ones(width)
        scale[channels] = gain
        with torch.no_grad():
            for lin in consumers:
                lin.weight.div_(scale.to(lin.weight))
        module.register_forward_pre_hook(_scale_hidden_states(scale), with_kwargs=True)
        count += 1
    return count


def _outlier_consumers(name: str, module: nn.Module) -> list[nn.Linear]:
    """Linears fed by ``module``'s main input: q/k/v of self-attention, q of cross-attention, FFN input."""
    if hasattr(module, "to_q") and isinstance(module.to_q, nn.Linear):
        is_cross = getattr(module, "is_cross_attention", False) or name.endswith("attn2")
        names = ("to_q",) if is_cross else ("to_q", "to_k", "to_v")
        return [getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Linear)]
    net = getattr(module, "net", None)
    if isinstance(net, nn.ModuleList) and len(net) and hasattr(net[0], "proj"):
        return [net[0].proj]
    return []


def _scale_hidden_states(scale: torch.Tensor):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * scale.to(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * scale.to(kwargs["hidden_states"])
        return args, kwargs

    return hook


def tiny_word_tokenizer(words: list[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` (no files needed, saves/loads like any HF tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or ("a an the red green blue yellow small large circle square triangle above below left right "
                      "of cat dog on moving fast slow photo").split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_pixart_pipeline(seed: int = 0):
    """A PixArt-α-shaped pipeline (T5 encoder, VAE, PixArt transformer, DPM-Solver) with tiny random weights."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = tiny_word_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=48, d_kv=16, d_ff=96, num_layers=2,
                                           num_heads=3, relative_attention_num_buckets=8)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
                                  norm_num_groups=8, sample_size=8).eval()
    return diffusers.PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                         transformer=tiny_model("pixart", seed),
                                         scheduler=diffusers.DPMSolverMultistepScheduler())


def capture_sdpa_inputs(model: nn.Module, kwargs: dict) -> list[list]:
    """[q, k, v, attn_mask] (detached copies) of every ``F.scaled_dot_product_attention`` call in one forward
    pass of ``model`` — real attention statistics for kernel checks."""
    captured = []

    class Capture(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kw=None):
            kw = kw or {}
            if func is nn.functional.scaled_dot_product_attention:
                captured.append([t.detach().clone() if torch.is_tensor(t) else t for t in args[:3]]
                                + [kw.get("attn_mask")])
            return func(*args, **kw)

    with torch.no_grad(), Capture():
        model(**kwargs)
    return captured
