"""Fast kernels (Triton on CUDA), each file keeping its plain-torch reference beside the fast version.

rmsnorm, rotary, kv_write, moe_routing, moe_experts, paged_attention (GQA decode), mla_decode, prefill_attention,
sampling, cuda_graphs. Importing any of them never needs Triton or a GPU (see _triton_support).
"""
