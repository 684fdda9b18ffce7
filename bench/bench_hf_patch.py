"""One training step of a Qwen2.5-7B-shaped causal LM: unpatched HF (eager) vs apply_kernels (ours) vs Liger.

`ours_weight_dtype` is apply_kernels(lm_head_grad_dtype="weight"): the lm-head gradient summed in bf16 across
token chunks, as Liger does, instead of our default fp32.

Full width (hidden 3584, 28 query / 4 KV heads, intermediate 18944, vocab 152064, untied head), 4 layers,
random bf16 weights, SDPA attention for everyone, one sequence of 8K or 16K tokens. A step is forward,
backward, fused AdamW and zero_grad(set_to_none), so the peak extra memory is gradients + activations +
temporaries on top of the weights and optimizer states (identical across providers). FLOPs are the model's
(6 N T for the matmuls + 6 L H D T^2 for causal attention), so TFLOP/s reads as model-FLOPs utilisation;
tokens/s = tokens / median. On CPU a tiny model runs through Triton's interpreter (ours and eager only).

Liger patches transformers' qwen2 module globally (RoPE function, RMSNorm and MLP classes): its run restores
the module afterwards so that no other provider is measured with Liger inside.
"""
import contextlib
import gc

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.harness import ON_GPU
from bench.shapes import MODELS, token_counts
from longvl.kernels.hf_patch import apply_kernels

DTYPE = torch.bfloat16
if ON_GPU:
    SHAPE, LAYERS = MODELS["qwen2.5-7b"], 4
    TOKENS = token_counts(8192, 16384)
else:
    SHAPE = dict(hidden=64, intermediate=88, heads=4, kv_heads=2, head_dim=16, vocab=151)
    LAYERS, TOKENS = 1, [32]
_FIRST_LOSS = {}  # tokens -> first step's loss of the first provider measured


def _model(device):
    config = Qwen2Config(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
                         intermediate_size=SHAPE["intermediate"], num_hidden_layers=LAYERS,
                         num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                         max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(DTYPE).train()


@contextlib.contextmanager
def _restored_qwen2_module():
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))
    try:
        yield
    finally:
        for name in [n for n in vars(modeling_qwen2) if n not in saved]:
            delattr(modeling_qwen2, name)
        for name, value in saved.items():
            setattr(modeling_qwen2, name, value)


def _flops(model, tokens):
    matmul_params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    attention = 6 * LAYERS * SHAPE["heads"] * SHAPE["head_dim"] * tokens**2
    return 6 * matmul_params * tokens + attention


@pytest.mark.parametrize("provider", ["eager", "ours", "ours_weight_dtype", "liger"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_qwen2_7b_train_step(measure, device, tokens, provider):
    if provider == "liger":
        if not ON_GPU:
            pytest.skip("liger is measured on GPU only")
        liger = pytest.importorskip("liger_kernel.transformers")
    torch.manual_seed(0)
    input_ids = torch.randint(0, SHAPE["vocab"], (1, tokens), device=device)
    with _restored_qwen2_module():
        model = _model(device)
        if provider.startswith("ours"):
            apply_kernels(model, lm_head_grad_dtype="weight" if provider == "ours_weight_dtype" else "float32")
        elif provider == "liger":
            liger.apply_liger_kernel_to_qwen2(model=model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=ON_GPU)

        def step():
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        # The first step allocates the optimizer states before memory is measured; every provider starts from
        # the same seed, so its first loss must match whichever provider ran first (bf16 noise allowed).
        first_loss = step().item()
        reference = _FIRST_LOSS.setdefault(tokens, first_loss)
        assert abs(first_loss - reference) < 0.01 * reference, (provider, first_loss, reference)
        if ON_GPU:
            torch.cuda.reset_peak_memory_stats()
        rec = measure("hf_train_step.qwen2_7b", provider, step,
                      shape={"tokens": tokens, "layers": LAYERS, **SHAPE}, dtype=DTYPE,
                      flops=_flops(model, tokens))
        rec.note = f"tokens/s={tokens / rec.median_ms * 1e3:.0f}"
        if ON_GPU:
            rec.note += f"; peak_total_mib={torch.cuda.max_memory_allocated() / 2**20:.0f}"
        del model, optimizer, step
    gc.collect()  # Liger binds a forward to its model instance: a cycle that only the collector frees
    if ON_GPU:
        torch.cuda.empty_cache()
