"""The comparison article's claims, each checked against numbers computed from the presets.

Every verdict is decided by code from the configs (fields, parameter counts, fits); the strings only
describe what was computed. Verdicts: "true", "false", "misleading".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from giants.analysis.hardware import get_gpu
from giants.analysis.memory import kv_cache_bytes, weight_bytes
from giants.analysis.params import count_params
from giants.analysis.perf import FitError, fit
from giants.presets import get_config


@dataclass(frozen=True)
class Claim:
    id: str
    model: str
    claim: str
    evidence: str
    verdict: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _tf(ok: bool) -> str:
    return "true" if ok else "false"


def _near(x: float, target: float, tol: float) -> bool:
    return abs(x - target) <= tol * target


def _fewest(cfg, gpu_name: str, context: int, dtype: str) -> int | None:
    try:
        return fit(cfg, get_gpu(gpu_name), context, 1, dtype).gpus
    except FitError:
        return None


def _measured(model: str, gpu: str) -> str:
    """The newest measured run of `model` on `gpu` (giants/analysis/measured_runs.json), or that there is none.
    Evidence only: the verdicts stay computed, and a random-weight run says so."""
    from giants.analysis.measured_runs import fit_lines

    return "; " + fit_lines(model, gpu, None)[0]


def check_claims(context: int = 8192) -> list[Claim]:
    claims: list[Claim] = []
    oss = get_config("gpt-oss-120b")
    pc = count_params(oss)

    # 1. gpt-oss-120b is a dense 120B decoder.
    dense = not oss.is_moe
    claims.append(Claim(
        "gpt-oss-dense", "gpt-oss-120b", "gpt-oss-120b is a dense 120B decoder",
        f"n_experts={oss.n_experts}, top-{oss.experts_per_token} routing: a mixture of experts with "
        f"{_b(pc.total)} total but {_b(pc.active)} active parameters per token "
        f"({100 * pc.active / pc.total:.1f}% of the total)",
        _tf(dense and _near(pc.total, 120e9, 0.05))))

    # 2. T5-style relative bias instead of rotary.
    claims.append(Claim(
        "gpt-oss-t5-bias", "gpt-oss-120b", "gpt-oss-120b uses T5-style relative position bias instead of rotary",
        f"position={oss.position!r}, rope_scaling={oss.rope_scaling!r} (factor {oss.rope_factor:g}, "
        f"theta {oss.rope_theta:g}); no relative-bias table ({pc.position} parameters)",
        _tf(oss.position == "t5_bias")))

    # 3. SwiGLU and RMSNorm.
    swiglu = oss.activation in ("silu_glu", "clamped_swiglu")
    rms = oss.norm_kind == "rmsnorm"
    clamped = oss.activation == "clamped_swiglu"
    claims.append(Claim(
        "gpt-oss-swiglu-rmsnorm", "gpt-oss-120b", "gpt-oss-120b uses SwiGLU and RMSNorm",
        f"activation={oss.activation!r}"
        + (f" (gate*sigmoid({oss.swiglu_alpha:g}*gate)*(up+1), clamped at {oss.swiglu_limit:g}: a SwiGLU variant)"
           if clamped else "")
        + f", norm_kind={oss.norm_kind!r}",
        _tf(swiglu and rms)))

    # 4. Llama 3 70B uses GQA, "drastically" cutting the KV cache.
    llama = get_config("llama-3-70b")
    kv = kv_cache_bytes(llama, context)
    kv_mha = kv_cache_bytes(llama.replace(n_kv_heads=llama.n_heads), context)
    ratio = kv_mha / kv
    claims.append(Claim(
        "llama-gqa", "llama-3-70b", 'Llama 3 70B uses GQA, "drastically" cutting the KV cache',
        f"{llama.n_heads} query heads share {llama.n_kv_heads} KV heads: KV cache at {context} tokens "
        f"{_gb(kv)} vs {_gb(kv_mha)} with MHA ({ratio:.0f}x smaller)",
        _tf(llama.n_kv_heads < llama.n_heads and ratio >= 4)))

    # 5. Gemma 2 27B uses standard multi-head attention.
    gemma = get_config("gemma-2-27b")
    g_kv = kv_cache_bytes(gemma, context)
    g_mha = kv_cache_bytes(gemma.replace(n_kv_heads=gemma.n_heads), context)
    claims.append(Claim(
        "gemma-mha", "gemma-2-27b", "Gemma 2 27B uses standard multi-head attention",
        f"{gemma.n_heads} query heads / {gemma.n_kv_heads} KV heads: grouped-query attention; KV cache at "
        f"{context} tokens {_gb(g_kv)} vs {_gb(g_mha)} with MHA; sliding window "
        f"{max(gemma.windows)} on {sum(1 for w in gemma.windows if w)} of {gemma.n_layers} layers",
        _tf(gemma.n_kv_heads == gemma.n_heads)))

    # 6-8. Mixtral 8x22B: ~141B total / ~39B active; top-2 of 8; experts "of 22B each".
    mix = get_config("mixtral-8x22b")
    mc = count_params(mix)
    claims.append(Claim(
        "mixtral-params", "mixtral-8x22b", "Mixtral 8x22B has ~141B total and ~39B active parameters",
        f"{_b(mc.total)} total; {_b(mc.active_with_embedding)} active per token with the input embedding "
        f"({_b(mc.active)} without)",
        _tf(round(mc.total / 1e9) == 141 and round(mc.active_with_embedding / 1e9) == 39)))
    claims.append(Claim(
        "mixtral-top2", "mixtral-8x22b", "Mixtral 8x22B routes each token to the top 2 of 8 experts",
        f"n_experts={mix.n_experts}, experts_per_token={mix.experts_per_token}",
        _tf(mix.n_experts == 8 and mix.experts_per_token == 2)))
    naive = mix.n_experts * 22e9
    claims.append(Claim(
        "mixtral-22b-experts", "mixtral-8x22b", 'Mixtral 8x22B has 8 experts "of 22B each"',
        f"an expert is only an FFN stack: {_b(mc.expert)} per expert across all {mix.n_layers} layers; "
        f"attention, embeddings and norms ({_b(mc.shared)}) are shared; 8 x 22B would be "
        f"{naive / 1e9:.0f}B, the model has {_b(mc.total)}; shared + one expert = {_b(mc.shared + mc.expert)}, "
        f"so the 22B is a one-expert model, not an expert",
        "true" if _near(mc.expert, 22e9, 0.1) else "misleading"))

    # 9. gpt-oss-120b needs 8x H100 at minimum.
    full = oss.max_context
    n_mx = _fewest(oss, "h100-80gb", full, "mxfp4")
    n_bf = _fewest(oss, "h100-80gb", full, "bf16")
    mx_fit = fit(oss, get_gpu("h100-80gb"), full, 1, "mxfp4") if n_mx else None
    claims.append(Claim(
        "gpt-oss-8xh100", "gpt-oss-120b", "gpt-oss-120b needs 8x H100 at minimum",
        f"as shipped (MXFP4 experts, bf16 rest: {_gb(weight_bytes(oss, 'mxfp4'))}) with a bf16 KV cache for the "
        f"full {full}-token context: {n_mx or 'more than 8'} x H100 80GB"
        + (f" ({_gb(mx_fit.memory.total)} used)" if mx_fit else "")
        + f"; all-bf16 ({_gb(weight_bytes(oss, 'bf16'))}): {n_bf or 'more than 8'} x H100"
        + _measured("gpt-oss-120b", "h100-80gb"),
        _tf(n_mx is None or n_mx >= 8)))

    # 10. Gemma 2 27B runs on a single 80GB A100.
    g_fit = _fewest(gemma, "a100-80gb", gemma.max_context, "bf16")
    claims.append(Claim(
        "gemma-1xa100", "gemma-2-27b", "Gemma 2 27B runs on a single 80GB A100",
        f"bf16 weights {_gb(weight_bytes(gemma, 'bf16'))} + KV cache {_gb(kv_cache_bytes(gemma, gemma.max_context))} "
        f"at its full {gemma.max_context}-token context: fewest A100 80GB = {g_fit}"
        + _measured("gemma-2-27b", "a100-80gb"),
        _tf(g_fit == 1)))
    return claims
