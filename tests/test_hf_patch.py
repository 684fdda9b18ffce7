"""apply_kernels / patch_model_class on tiny random Hugging Face models: the patched model must train, evaluate
and generate like the unpatched one, and keep its state-dict keys.

Tolerances, fp32 (tiny models on the `device`): loss rtol 1e-5; every parameter's gradient rtol 1e-4, atol
1e-6 (our kernels sum in another order than eager PyTorch); losses of 20 AdamW steps rtol 1e-4; greedy tokens
equal. GPU, bf16 at hidden 1024: the loss within 1 % of the unpatched bf16 model's; each gradient's error
against an fp32 reference at most twice the unpatched bf16 model's error plus 0.01; 20 AdamW steps' losses
within 2 %; greedy tokens (in fp32, where near-tied argmaxes cannot flip) equal.
"""
import copy
import json
import weakref

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel)

from longvl.kernels.hf_patch import apply_kernels, patch_model_class

VOCAB = 151
IMAGE_TOKEN = VOCAB - 1  # Eagle's <IMG_CONTEXT> in the tiny vocabulary
TEXT_FAMILIES = ["qwen2", "llama", "qwen3"]
FAMILIES = TEXT_FAMILIES + ["eagle"]
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def _config(family, hidden=64, intermediate=88, layers=2, heads=4, kv_heads=2, vocab=VOCAB):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    if family == "qwen2":  # Qwen2.5's small models tie the embedding and the LM head
        return Qwen2ForCausalLM, Qwen2Config(**common, tie_word_embeddings=True)
    if family == "llama":  # biases everywhere exercise the fused MLP's bias path
        return LlamaForCausalLM, LlamaConfig(**common, mlp_bias=True, attention_bias=True)
    return Qwen3ForCausalLM, Qwen3Config(**common, head_dim=hidden // heads)


def _randomize(model):
    """Weights far from HF's near-zero init (unit-scale activations at any width) and norm weights away from
    one, so that every gradient matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() > 1:
                p.normal_(0, 1.2 / p[0].numel() ** 0.5)
            else:
                p.normal_(0, 0.15)
    return model


def _model(family, device, layers=2, **sizes):
    """A random model: a causal LM, or Eagle (2-layer SigLIP, 56 px tiles of 4 tokens, Qwen2 LM)."""
    if family == "eagle":
        from longvl.eagle.configuration_eagle import tiny_eagle_config
        from longvl.eagle.modeling_eagle import EagleForConditionalGeneration

        config = tiny_eagle_config(vocab_size=VOCAB, image_token_index=IMAGE_TOKEN)
        config.text_config.num_hidden_layers = layers
        return _randomize(EagleForConditionalGeneration(config)).to(device)
    model_class, config = _config(family, layers=layers, **sizes)
    return _randomize(model_class(config)).to(device)


def _pair(family, device, layers=2, **flags):
    """(unpatched, patched) copies of one random model, both in training mode."""
    reference = _model(family, device, layers)
    patched = apply_kernels(copy.deepcopy(reference), **flags)
    return reference.train(), patched.train()


def _batch(device, family="qwen2", batch=2, seq=11, vocab=VOCAB):
    """Random tokens, a quarter of the labels ignored, left padding in every row but the first; for Eagle one
    56 px tile per row whose 4 <IMG_CONTEXT> tokens follow the first token."""
    input_ids = torch.randint(0, vocab - 1, (batch, seq))  # never the image token
    labels = input_ids.clone()
    labels[torch.rand(batch, seq) < 0.25] = -100
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1:, :3] = 0
    labels[1:, :3] = -100
    inputs = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
    if family == "eagle":
        attention_mask[1:, :3] = 1
        input_ids[:, 1:5] = IMAGE_TOKEN
        labels[:, 1:5] = -100
        inputs["pixel_values"] = torch.randn(batch, 3, 56, 56)
    return {k: v.to(device) for k, v in inputs.items()}


def _fused_counts(model):
    """How many modules of each kind apply_kernels swapped (its classes live in longvl.kernels.hf_patch)."""
    counts = dict.fromkeys(("RMSNorm", "MLP", "Attention", "RotaryEmbedding", "CausalLM"), 0)
    for module in model.modules():
        if type(module).__module__ == "longvl.kernels.hf_patch":
            name = type(module).__name__
            kinds = ("RMSNorm", "MLP", "Attention", "RotaryEmbedding")
            counts[next((kind for kind in kinds if name.endswith(kind)), "CausalLM")] += 1
    return counts


def _assert_grads_match(patched, reference, **tol):
    """Every parameter: both gradients absent (frozen or unused) or both finite and close."""
    ref_params = dict(reference.named_parameters())
    assert [name for name, _ in patched.named_parameters()] == list(ref_params)
    for name, p in patched.named_parameters():
        ref = ref_params[name]
        assert (p.grad is None) == (ref.grad is None), name
        if ref.grad is not None:
            assert torch.isfinite(p.grad).all(), name
            torch.testing.assert_close(p.grad, ref.grad, msg=lambda m: f"{name}: {m}", **tol)
    assert any(p.grad is not None for p in ref_params.values())


def _assert_same_step(reference, patched, batch, **kwargs):
    """One forward + backward of both models: same loss (rtol 1e-5) and gradients; returns patched's output."""
    for model in (reference, patched):
        model.zero_grad()
    expected, got = reference(**batch, **kwargs), patched(**batch, **kwargs)
    assert torch.isfinite(got.loss)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0, msg=lambda m: f"{kwargs}: {m}")
    expected.loss.backward()
    got.loss.backward()
    _assert_grads_match(patched, reference, **GRAD_TOL)
    return got


def _expected_counts(family, layers=2):
    """Fused modules apply_kernels must produce: per layer 2 norms (+ Qwen3's q/k norms), one MLP, one
    attention block, plus the final norm; Eagle's SigLIP tower adds none."""
    norms = 2 * layers + 1 + (2 * layers if family == "qwen3" else 0)
    return {"RMSNorm": norms, "MLP": layers, "Attention": layers, "RotaryEmbedding": 1, "CausalLM": 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_gradient_match(family, device):
    reference, patched = _pair(family, device)
    assert _fused_counts(patched) == _expected_counts(family)
    got = _assert_same_step(reference, patched, _batch(device, family))
    assert got.logits is None  # training with labels: the fused loss never builds logits


def test_loss_kwargs_follow_hf(device):
    """num_items_in_batch (gradient accumulation), a given shift_labels and ignore_index mean what HF means."""
    reference, patched = _pair("qwen2", device)
    batch = _batch(device)
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    shift[shift == -100] = -1
    shift[0, :2] = -1  # two more tokens ignored
    for kwargs in (dict(num_items_in_batch=torch.tensor(40)),
                   dict(shift_labels=shift, ignore_index=-1),
                   dict(num_items_in_batch=7, shift_labels=shift, ignore_index=-1)):
        _assert_same_step(reference, patched, batch, **kwargs)


def test_logits_on_request_and_in_eval(device):
    reference, patched = _pair("qwen2", device)
    batch = _batch(device)
    expected = reference(**batch)
    got = patched(**batch, return_logits=True, logits_to_keep=4)
    torch.testing.assert_close(got.logits, expected.logits[:, -4:], rtol=1e-5, atol=1e-5)
    as_tuple = patched(**batch, return_dict=False)
    torch.testing.assert_close(as_tuple[0], expected.loss, rtol=1e-5, atol=0)
    for model in (reference, patched):
        model.eval()
    with torch.no_grad():
        expected, got = reference(**batch), patched(**batch)
    assert got.logits is not None  # eval keeps HF's logits path
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_adamw_loss_curve_matches(family, device):
    reference, patched = _pair(family, device, layers=1)  # one layer: the interpreter is slow, 20 steps are many
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (reference, patched)]
    batches = [_batch(device, family, batch=1, seq=7) for _ in range(4)]
    curves = ([], [])
    for step in range(20):
        for model, optimizer, curve in zip((reference, patched), optimizers, curves):
            loss = model(**batches[step % len(batches)]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
    assert curves[0][-1] < curves[0][0]  # it trains
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_gives_the_same_tokens(family, device):
    reference, patched = _pair(family, device)
    prompt = {k: v for k, v in _batch(device, family, seq=7).items() if k != "labels"}
    prompt["attention_mask"] = torch.ones_like(prompt["input_ids"])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = reference.eval().generate(**prompt, **settings)
    got = patched.eval().generate(**prompt, **settings)
    assert got.shape == (2, 13)
    assert torch.equal(got, expected)


def test_save_and_load_round_trip(tmp_path):
    reference, patched = _pair("qwen3", "cpu")
    assert list(patched.state_dict()) == list(reference.state_dict())
    patched.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["architectures"] == ["Qwen3ForCausalLM"]
    loaded = Qwen3ForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is Qwen3ForCausalLM  # the saved config names HF's class, not ours
    assert list(loaded.state_dict()) == list(reference.state_dict())
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_class_level_patch(tmp_path, device):
    class TinyQwen2(Qwen2ForCausalLM):  # a subclass keeps the patch away from other tests' Qwen2 models
        pass

    assert patch_model_class(TinyQwen2) is TinyQwen2
    patch_model_class(TinyQwen2, rope=False)  # patching again replaces the flags, it does not stack
    model_class, config = _config("qwen2")
    built = TinyQwen2(config)
    assert _fused_counts(built) == {"RMSNorm": 5, "MLP": 2, "Attention": 0, "RotaryEmbedding": 0, "CausalLM": 1}
    assert isinstance(built, TinyQwen2) and type(built).__name__ == "TinyQwen2"
    _randomize(built).save_pretrained(tmp_path)
    loaded = TinyQwen2.from_pretrained(tmp_path)
    assert _fused_counts(loaded) == _fused_counts(built)
    reference = model_class.from_pretrained(tmp_path)
    assert _fused_counts(reference) == dict.fromkeys(("RMSNorm", "MLP", "Attention", "RotaryEmbedding", "CausalLM"), 0)
    batch = _batch(device)
    loaded, reference = loaded.to(device).train(), reference.to(device).train()
    torch.testing.assert_close(loaded(**batch).loss, reference(**batch).loss, rtol=1e-5, atol=0)


def test_flags_and_idempotence(device):
    reference, patched = _pair("llama", device, rms_norm=False, swiglu=False, linear_cross_entropy=False)
    assert _fused_counts(patched) == {"RMSNorm": 0, "MLP": 0, "Attention": 2, "RotaryEmbedding": 1, "CausalLM": 0}
    apply_kernels(patched)
    apply_kernels(patched)
    assert _fused_counts(patched) == _expected_counts("llama")
    batch = _batch(device)
    torch.testing.assert_close(patched(**batch).loss, reference(**batch).loss, rtol=1e-5, atol=0)
    alive = weakref.ref(patched)
    del patched
    assert alive() is None  # no self-reference: `del` frees a patched model's memory at once


def test_loss_settings_reach_the_fused_loss(device, monkeypatch):
    """apply_kernels(loss_chunking=..., lm_head_grad_dtype=...) reach the fused loss, patching again updates them,
    bad values raise."""
    import longvl.kernels.hf_patch as hf_patch

    reference, patched = _pair("llama", device, lm_head_grad_dtype="weight")
    seen = []

    def recording_loss(*args, **kwargs):
        seen.append((kwargs["chunking"], kwargs["dw_dtype"]))
        return fused_loss(*args, **kwargs)

    fused_loss = hf_patch.fused_linear_cross_entropy
    monkeypatch.setattr(hf_patch, "fused_linear_cross_entropy", recording_loss)
    _assert_same_step(reference, patched, _batch(device))  # fp32 weights: the same sums either way
    apply_kernels(patched, loss_chunking="vocab")
    patched(**_batch(device))
    assert seen == [("tokens", "weight"), ("vocab", "float32")]
    with pytest.raises(ValueError, match="lm_head_grad_dtype"):
        apply_kernels(patched, lm_head_grad_dtype="bf16")
    with pytest.raises(ValueError, match="lm_head_grad_dtype must be 'float32'"):
        apply_kernels(patched, loss_chunking="vocab", lm_head_grad_dtype="weight")
    with pytest.raises(ValueError, match="loss_chunking"):
        patch_model_class(LlamaForCausalLM, loss_chunking="rows")


def test_gradient_checkpointing(device):
    reference, patched = _pair("qwen3", device, layers=1)
    for model in (reference, patched):
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25 deprecates the old name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_same_step(reference, patched, _batch(device), use_cache=False)


def test_non_silu_mlp_is_left_alone():
    model_class, config = _config("llama")
    config.hidden_act = "gelu"
    model = apply_kernels(model_class(config))
    assert _fused_counts(model)["MLP"] == 0


def test_siglip_vision_is_accepted_and_unchanged():
    """No kernel of ours fits SigLIP (LayerNorm, GELU MLP, no RoPE): it is accepted, and computes the same."""
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=14)
    reference = _randomize(SiglipVisionModel(config)).train()
    patched = apply_kernels(copy.deepcopy(reference))
    assert [type(m) for m in patched.modules()] == [type(m) for m in reference.modules()]
    pixels = torch.randn(2, 3, 28, 28)
    expected, got = reference(pixels).last_hidden_state, patched(pixels).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    probe = torch.randn_like(expected)
    (expected * probe).sum().backward()
    (got * probe).sum().backward()
    _assert_grads_match(patched, reference, rtol=0, atol=0)


def test_peft_lora_model(device):
    peft = pytest.importorskip("peft")
    reference = _model("qwen2", device)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                           init_lora_weights=False)
    reference = peft.get_peft_model(reference, lora).train()
    patched = apply_kernels(copy.deepcopy(reference))
    assert _fused_counts(patched) == _expected_counts("qwen2")
    _assert_same_step(reference, patched, _batch(device))


def test_unsupported_models_raise_naming_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel contains no supported model type.*Qwen2.*Llama.*Qwen3"):
        apply_kernels(gpt2)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not a supported model type.*SigLIP"):
        patch_model_class(GPT2LMHeadModel)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        apply_kernels("Qwen/Qwen2.5-7B")


def _relative_error(got, expected):
    return ((got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_bf16_training_on_gpu_at_realistic_width(family):
    sizes = dict(hidden=1024, intermediate=2816, layers=2, heads=8, kv_heads=2, vocab=32000)
    reference32 = _model(family, "cuda", **sizes).train()
    hf16 = copy.deepcopy(reference32).bfloat16()
    ours16 = apply_kernels(copy.deepcopy(hf16))
    batch = _batch("cuda", batch=2, seq=1024, vocab=32000)
    losses = {}
    for name, model in (("fp32", reference32), ("hf", hf16), ("ours", ours16)):
        loss = model(**batch).loss
        loss.backward()
        losses[name] = loss.float()
    torch.testing.assert_close(losses["ours"], losses["hf"], rtol=1e-2, atol=0)
    hf_params, ours_params = dict(hf16.named_parameters()), dict(ours16.named_parameters())
    for name, p in reference32.named_parameters():
        ours_error = _relative_error(ours_params[name].grad, p.grad)
        hf_error = _relative_error(hf_params[name].grad, p.grad)
        assert ours_error <= 2 * hf_error + 0.01, f"{name}: ours {ours_error:.4f} vs HF bf16 {hf_error:.4f}"

    curves = {}
    for name, model in (("hf", hf16), ("ours", ours16)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        curves[name] = []
        for _ in range(20):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            curves[name].append(loss.item())
    torch.testing.assert_close(torch.tensor(curves["ours"]), torch.tensor(curves["hf"]), rtol=2e-2, atol=0)

    # Greedy decoding compares exactly in fp32 (bf16 rounding can flip near-tied argmaxes in either model).
    ours32 = apply_kernels(copy.deepcopy(reference32)).eval()
    prompt = torch.randint(0, 32000, (2, 16), device="cuda")
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours32.generate(prompt, **settings), reference32.eval().generate(prompt, **settings))


def test_rotary_angles_stay_exact_at_a_million_positions():
    """HF's fp32 angles drift by hundredths of a radian near 10^6; the patched embedding matches fp64 cos/sin."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, rope_theta=1e6,
                         max_position_embeddings=2**21)
    rotary = Qwen2ForCausalLM(config).model.rotary_emb
    positions = torch.tensor([[0, 1, 4095, 524_287, 1_048_575, 1_048_576, 2_000_003]])
    dim = 128
    inv = 1.0 / (1e6 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions[..., None].double() * inv
    want_cos, want_sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    x = torch.zeros(1, 1, dtype=torch.float32)
    hf_cos, _ = rotary(x, positions)
    apply_kernels(Qwen2ForCausalLM(config), linear_cross_entropy=False)  # the class patch is per instance
    model = apply_kernels(Qwen2ForCausalLM(config))
    cos, sin = model.model.rotary_emb(x, positions)
    assert (hf_cos.double() - want_cos).abs().max() > 1e-3          # the fp32 drift this patch removes
    torch.testing.assert_close(cos.double(), want_cos, rtol=0, atol=2e-7)  # one fp32 rounding of cos / sin
    torch.testing.assert_close(sin.double(), want_sin, rtol=0, atol=2e-7)
