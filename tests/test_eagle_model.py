"""Eagle model: pixel-shuffle order, splicing, forward/backward/generate, the released checkpoint layout."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from longvl.eagle.configuration_eagle import EagleConfig, eagle2_5_8b_config, tiny_eagle_config
from longvl.eagle.modeling_eagle import EagleForConditionalGeneration
from longvl.eagle.pixel_shuffle import pixel_shuffle

VOCAB, IMAGE_TOKEN = 96, 95


def tiny_model(**overrides):
    torch.manual_seed(0)
    return EagleForConditionalGeneration(tiny_eagle_config(VOCAB, IMAGE_TOKEN, **overrides)).eval()


def sample_ids(tiles, tokens_per_tile=4, text=7):
    """Text, an image block of `tiles` tiles, more text: (1, L) ids with the image slots in the middle."""
    ids = torch.randint(0, IMAGE_TOKEN - 1, (1, 2 * text + tiles * tokens_per_tile))
    ids[0, text:text + tiles * tokens_per_tile] = IMAGE_TOKEN
    return ids


def test_pixel_shuffle_channel_order():
    """Token (r, c) = cells (2r,2c), (2r,2c+1), (2r+1,2c), (2r+1,2c+1) concatenated; tokens row-major."""
    tiles, grid, channels = 2, 6, 5
    cells = torch.randn(tiles, grid * grid, channels, dtype=torch.float64)
    out = pixel_shuffle(cells, 2)
    assert out.shape == (tiles, 9, 4 * channels)
    cell = cells.reshape(tiles, grid, grid, channels)
    for r in range(3):
        for c in range(3):
            expected = torch.cat([cell[:, 2 * r, 2 * c], cell[:, 2 * r, 2 * c + 1],
                                  cell[:, 2 * r + 1, 2 * c], cell[:, 2 * r + 1, 2 * c + 1]], dim=-1)
            torch.testing.assert_close(out[:, r * 3 + c], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="divisible"):
        pixel_shuffle(torch.randn(1, 25, 3), 2)


def test_splice_positions_and_count_check():
    model = tiny_model()
    ids = sample_ids(tiles=2)
    embeds = model.get_input_embeddings()(ids)
    features = torch.randn(2, 4, embeds.shape[-1])
    out = model.splice_image_features(ids, embeds, features)
    slots = (ids[0] == IMAGE_TOKEN).nonzero().squeeze(1)
    torch.testing.assert_close(out[0, slots], features.reshape(8, -1), rtol=0, atol=0)
    others = (ids[0] != IMAGE_TOKEN).nonzero().squeeze(1)
    torch.testing.assert_close(out[0, others], embeds[0, others], rtol=0, atol=0)
    with pytest.raises(ValueError, match="8 <IMG_CONTEXT> tokens .* 4 image feature vectors"):
        model.splice_image_features(ids, embeds, features[:1])


def test_forward_backward_matches_manual_composition():
    """fp32: the model's loss equals vision -> shuffle -> mlp1 -> splice -> LLM done by hand; every weight
    of both towers and the connector gets a finite, non-zero gradient."""
    model = tiny_model().train()
    ids, pixels = sample_ids(tiles=3), torch.randn(3, 3, 56, 56)
    loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    with torch.no_grad():
        cells = model.vision_model.vision_model(pixel_values=pixels).last_hidden_state
        features = model.mlp1(pixel_shuffle(cells, 2)).reshape(-1, 64)
        embeds = model.language_model.get_input_embeddings()(ids).clone()
        embeds[ids == IMAGE_TOKEN] = features
        manual = model.language_model(inputs_embeds=embeds, labels=ids).loss
    torch.testing.assert_close(loss.detach(), manual, rtol=1e-5, atol=1e-6)


def test_micro_batches_precomputed_features_and_flags():
    model = tiny_model()
    pixels = torch.randn(5, 3, 56, 56)
    with torch.no_grad():
        whole = model.extract_features(pixels)
        torch.testing.assert_close(model.extract_features(pixels, micro_batch=2), whole, rtol=1e-5, atol=1e-6)
        ids = sample_ids(tiles=5)
        direct = model(input_ids=ids, pixel_values=pixels).logits
        given = model(input_ids=ids, image_features=whole).logits
        torch.testing.assert_close(given, direct, rtol=1e-5, atol=1e-5)
        flagged = model(input_ids=sample_ids(tiles=3), pixel_values=pixels,
                        image_flags=torch.tensor([1, 0, 1, 1, 0])).logits
        assert torch.isfinite(flagged).all()
    with pytest.raises(ValueError, match=r"pixel_values must be \(tiles, 3, 56, 56\)"):
        model.extract_features(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, pixel_values=pixels, image_features=whole)


def test_flagged_off_tiles_still_get_a_gradient_path():
    """Padding tiles of text-only samples join the graph with weight 0 (FSDP needs every rank's grads)."""
    model = tiny_model().train()
    pixels = torch.randn(2, 3, 56, 56, requires_grad=True)
    ids = torch.randint(0, IMAGE_TOKEN - 1, (1, 9))
    model(input_ids=ids, pixel_values=pixels, image_flags=torch.tensor([0, 0]), labels=ids).loss.backward()
    assert pixels.grad is not None and (pixels.grad == 0).all()
    assert model.mlp1[1].weight.grad is not None


def test_select_layer_uses_that_hidden_state():
    model = tiny_model(select_layer=-2)
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        hidden = model.vision_model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.extract_features(pixels), model.mlp1(pixel_shuffle(hidden, 2)))


def test_gradient_checkpointing_both_towers_same_gradients():
    ids, pixels = sample_ids(tiles=2), torch.randn(2, 3, 56, 56)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25 deprecates the old name
                model.activation_checkpointing_enable()
            else:
                model.gradient_checkpointing_enable()
            layers = list(model.vision_model.vision_model.encoder.layers) + list(model.language_model.model.layers)
            assert all(layer.gradient_checkpointing for layer in layers)
        model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_generate_matches_greedy_recompute():
    """generate() with the KV cache equals argmax decoding that reruns the whole prompt and image each step."""
    model = tiny_model()
    ids, pixels = sample_ids(tiles=2), torch.randn(2, 3, 56, 56)
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                         max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=seq, pixel_values=pixels).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_save_load_round_trip_is_bitwise(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded checkpoint"
    assert set(index["weight_map"]) == set(model.state_dict())
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("vision_config", "text_config", "select_layer", "force_image_size", "downsample_ratio", "template",
                "dynamic_image_size", "use_thumbnail", "min_dynamic_tiles", "max_dynamic_tiles",
                "image_token_index", "use_pixel_shuffle", "mlp_connector_layers"):
        assert key in config, key
    loaded = EagleForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids, pixels = sample_ids(tiles=1), torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=pixels).logits,
                           model(input_ids=ids, pixel_values=pixels).logits)


def test_loads_a_checkpoint_written_in_the_release_layout(tmp_path):
    """Shards + index written by hand with the released names and a release-style config.json (extra keys,
    the unused SigLIP pooling head) load with no conversion."""
    source = tiny_model()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["vision_model.vision_model.head.probe"] = torch.randn(1, 1, 32)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = source.config.to_dict()
    config.update(architectures=["Eagle2_5_VLForConditionalGeneration"], loss_version="efficient_v2_cp_head")
    config["vision_config"] = {**config["vision_config"], "model_type": "siglip_vision_model"}
    config["vision_config"].pop("vision_use_head")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = EagleForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.loss_version == "efficient_v2_cp_head"
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_8b_structure_key_set_on_meta():
    config = eagle2_5_8b_config()
    assert config.tokens_per_tile == 256
    with torch.device("meta"):
        model = EagleForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    vision = [k for k in shapes if k.startswith("vision_model.vision_model.")]
    llm = [k for k in shapes if k.startswith("language_model.")]
    assert len(vision) + len(llm) + 6 == len(shapes)
    vision_layers = {int(m.group(1)) for k in vision if (m := re.search(r"encoder\.layers\.(\d+)\.", k))}
    llm_layers = {int(m.group(1)) for k in llm if (m := re.search(r"model\.layers\.(\d+)\.", k))}
    assert vision_layers == set(range(27)) and llm_layers == set(range(28))
    assert {k.split(".")[2] for k in vision} == {"embeddings", "encoder", "post_layernorm"}
    assert len(vision) == 3 + 27 * 16 + 2 and len(llm) == 1 + 28 * 12 + 2
    expected = {
        "mlp1.0.weight": (4608,), "mlp1.0.bias": (4608,), "mlp1.1.weight": (3584, 4608), "mlp1.1.bias": (3584,),
        "mlp1.3.weight": (3584, 3584), "mlp1.3.bias": (3584,),
        "vision_model.vision_model.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
        "vision_model.vision_model.embeddings.position_embedding.weight": (1024, 1152),
        "vision_model.vision_model.encoder.layers.26.mlp.fc1.weight": (4304, 1152),
        "vision_model.vision_model.post_layernorm.weight": (1152,),
        "language_model.model.embed_tokens.weight": (152064, 3584),
        "language_model.model.layers.27.self_attn.k_proj.weight": (512, 3584),
        "language_model.model.layers.0.self_attn.q_proj.bias": (3584,),
        "language_model.model.layers.0.mlp.gate_proj.weight": (18944, 3584),
        "language_model.model.norm.weight": (3584,),
        "language_model.lm_head.weight": (152064, 3584),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert 8.0e9 < sum(v.numel() for v in model.parameters()) < 8.1e9


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="force_image_size"):
        tiny_eagle_config(VOCAB, IMAGE_TOKEN, force_image_size=448)
    with pytest.raises(ValueError, match="mlp_connector_layers"):
        tiny_eagle_config(VOCAB, IMAGE_TOKEN, mlp_connector_layers=1)
    with pytest.raises(ValueError, match="divisible"):
        EagleConfig(vision_config=dict(image_size=42, patch_size=14, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2))


def test_kernel_patches_match_eager(device):
    """apply_kernels swaps in our Triton RMSNorm / RoPE / SwiGLU / linear+CE (on the `device`: the
    interpreter on CPU); fp32 loss within rtol 1e-5 and every gradient within rtol 1e-4 of eager's."""
    eager, patched = tiny_model().train().to(device), tiny_model().train().to(device)
    assert patched.apply_kernels() is patched
    assert type(patched.language_model.model.layers[0].mlp).__name__.startswith("Fused")
    ids, pixels = sample_ids(tiles=2).to(device), torch.randn(2, 3, 56, 56, device=device)
    losses = []
    for model in (eager, patched):
        loss = model(input_ids=ids, pixel_values=pixels, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(eager.named_parameters(), patched.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
