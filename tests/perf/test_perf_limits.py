"""The model at its limits: decode at batch 1 is weight-streaming, long prefill is compute-bound."""
import pytest

from fractal.perf.floor import load_gpu, load_model_spec, step_floor


def test_decode_batch1_is_weight_bytes_over_bandwidth():
    m, g = load_model_spec("llama-3.1-8b"), load_gpu("h100")
    f = step_floor(m, g, num_seqs=1, new_tokens_per_seq=1, context_len=128)
    weights = (m.params_total - m.embedding_params()) * 2  # every weight except the embedding table, bf16
    assert f.bound == "hbm"
    assert f.floor_s == pytest.approx(weights / g.hbm_bw, rel=0.02)
    assert f.mbu(f.floor_s) == pytest.approx(1.0, rel=0.01)


def test_deepseek_decode_batch1_reads_activated_weights():
    m, g = load_model_spec("deepseek-v3"), load_gpu("h20")
    f = step_floor(m, g, num_seqs=1, new_tokens_per_seq=1, context_len=1000, weight_dtype="fp8")
    activated = m.params_activated - m.embedding_params()  # fp8 = 1 byte each, router kept in bf16
    assert f.bound == "hbm"
    assert f.weight_bytes == pytest.approx(activated, rel=0.02)
    assert f.floor_s == pytest.approx(activated / g.hbm_bw, rel=0.05)


def test_long_prefill_is_compute_bound():
    m, g = load_model_spec("llama-3.1-8b"), load_gpu("h100")
    T = 8192
    f = step_floor(m, g, num_seqs=1, new_tokens_per_seq=T, context_len=0)
    matmul = 2 * (m.params_total - m.embedding_params() - m.lm_head_params()) * T + 2 * m.lm_head_params()
    attn = 4 * T * (T + 1) / 2 * 32 * 128 * 32  # 2 matmuls x 2 FLOPs x pairs x heads x head_dim x layers
    assert f.bound == "compute"
    assert f.flops == pytest.approx(matmul + attn, rel=0.01)
    assert f.compute_time_s == pytest.approx(f.flops / g.peak_flops("bf16"))
    assert f.floor_s < 1.25 * f.compute_time_s


def test_decode_turns_compute_bound_with_batch():
    g = load_gpu("h100")
    small = step_floor("llama-3.1-8b", g, num_seqs=1, new_tokens_per_seq=1, context_len=512)
    big = step_floor("llama-3.1-8b", g, num_seqs=1024, new_tokens_per_seq=1, context_len=16)
    assert small.bound == "hbm" and big.bound == "compute"
    assert big.floor_s / 1024 < small.floor_s / 10  # batching amortises the weight reads


def test_floor_on_plans_and_fp8():
    g = load_gpu("h100")
    f1 = step_floor("llama-3.1-70b", g, num_seqs=1, new_tokens_per_seq=1, context_len=100)
    f8 = step_floor("llama-3.1-70b", g, num_seqs=1, new_tokens_per_seq=1, context_len=100, plan="tp8")
    assert f8.weight_bytes == pytest.approx(f1.weight_bytes / 8, rel=0.01)
    assert f8.comm_bytes > 0 and f1.comm_bytes == 0
    q = step_floor("llama-3.1-8b", g, num_seqs=1, new_tokens_per_seq=1, context_len=100, weight_dtype="fp8")
    assert q.compute_dtype == "fp8" and q.peak_flops == g.peak_flops("fp8")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_seqs=0, new_tokens_per_seq=1, context_len=0), "num_seqs=0 is invalid"),
    (dict(num_seqs=2, new_tokens_per_seq=[1, 1, 1], context_len=0), "new_tokens_per_seq has 3 entries"),
    (dict(num_seqs=2, new_tokens_per_seq=1, context_len=[5]), "context_len has 1 entries"),
    (dict(num_seqs=2, new_tokens_per_seq=[4, 0], context_len=0), "new_tokens_per_seq=0 is invalid"),
    (dict(num_seqs=2, new_tokens_per_seq=1, context_len=[3, -7]), "context_len=-7 is invalid"),
])
def test_step_floor_errors_name_the_value(kwargs, message):
    from fractal.errors import FractalError

    with pytest.raises(FractalError, match=message):
        step_floor("llama-3.1-8b", "h100", **kwargs)
