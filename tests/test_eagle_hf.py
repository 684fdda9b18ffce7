"""Eagle as a Hugging Face model: Auto classes, the processor's HF API, generate, export, kernels, Trainer.

Everything runs at tiny size on CPU (a 56-pixel, 4-tokens-per-tile model and the built-in tokenizer); the
tests marked `gpu` repeat generation and the README snippet on CUDA.
"""
import copy
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import longvl.eagle  # noqa: F401  (registers the Auto classes)
from longvl.eagle.configuration_eagle import EagleConfig, tiny_eagle_config
from longvl.eagle.export import default_file_mode, generation_config_for, weight_files, write_hf_metadata
from longvl.eagle.image_processing_eagle import EagleImageProcessor
from longvl.eagle.modeling_eagle import EagleForConditionalGeneration
from longvl.eagle.processing.template import IGNORE_INDEX
from longvl.eagle.processing.tokenizer import IMG_CONTEXT, tiny_tokenizer
from longvl.eagle.processor import CHAT_TEMPLATE, EagleProcessor, parse_chatml
from tests.distributed import run_distributed
from tests.readme_blocks import readme_block
from tests.test_eagle_video import write_video
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoProcessor)

# The README's quick start, run as is by test_readme_snippet (CPU) and test_readme_snippet_on_gpu.
README_SNIPPET = readme_block("quick-start")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def config(tokenizer):
    return tiny_eagle_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMG_CONTEXT))


@pytest.fixture(scope="module")
def processor(tokenizer, config):
    return EagleProcessor.from_config(config, tokenizer, min_frames=2, max_frames=6)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return EagleForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, processor, config):
    """The tiny model written as a release-style folder: sharded weights, config, tokenizer, processor."""
    path = tmp_path_factory.mktemp("eagle")
    model.save_pretrained(path, max_shard_size="200KB")
    write_hf_metadata(path, config, processor=processor)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", frames=37, fps=10.0)


def picture(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def ask(content):
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": content}]


def greedy_reference(model, input_ids, pixel_values, steps):
    """Argmax decoding by hand: vision once, then the whole sequence's embeddings re-run every step (no cache)."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            embeds = model.splice_image_features(input_ids, embeds, model.extract_features(pixel_values))
        tokens = []
        for _ in range(steps):
            logits = model.language_model(inputs_embeds=embeds).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
            tokens.append(token)
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)], dim=1)
    return torch.cat([input_ids] + tokens, dim=1)


def generate(model, inputs, steps, **options):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, eos_token_id=None, **options)


# --- Auto classes and the folder -----------------------------------------------------------------------------------
def test_auto_classes_know_eagle(config):
    assert type(AutoConfig.for_model("eagle_2_5_vl")) is EagleConfig
    for auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
        assert type(auto.from_config(config)) is EagleForConditionalGeneration


def test_folder_has_every_file_and_loads_with_auto_classes(folder, model, processor, config):
    names = set(os.listdir(folder))
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert name in names, name
    shards = weight_files(folder)
    assert len(shards) > 1
    assert {oct(os.stat(folder / n).st_mode & 0o777) for n in names} == {oct(default_file_mode())}
    assert json.loads((folder / "config.json").read_text())["model_type"] == "eagle_2_5_vl"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == processor.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])

    loaded, loaded_processor = AutoModel.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    assert type(loaded_processor) is EagleProcessor and type(loaded_processor.image_processor) is EagleImageProcessor
    assert loaded_processor.chat_template == CHAT_TEMPLATE
    for key in ("tokens_per_tile", "sample_fps", "min_frames", "max_frames", "video_backend"):
        assert getattr(loaded_processor, key) == getattr(processor, key), key
    assert loaded_processor.image_processor.to_dict() == processor.image_processor.to_dict()
    inputs = processor(text=ask("<image>\nWhat is it?"), images=[picture(120, 60)], return_tensors="pt")
    again = loaded_processor(text=ask("<image>\nWhat is it?"), images=[picture(120, 60)], return_tensors="pt")
    for key in inputs:
        assert torch.equal(inputs[key], again[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert loaded.generation_config.eos_token_id == generation["eos_token_id"]


def test_release_layout_checkpoint_loads_with_automodel(tmp_path, model):
    """Shards + index written by hand with the released names, and a release-style config.json: architecture
    name, remote-code auto_map (whose files are absent), extra keys, the unused SigLIP head."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["vision_model.vision_model.head.probe"] = torch.randn(1, 1, 32)
    names = sorted(state)
    weight_map = {}
    for number, keys in enumerate((names[::2], names[1::2]), start=1):
        file = f"model-{number:05d}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict()
    config.update(architectures=["Eagle2_5_VLForConditionalGeneration"], loss_version="efficient_v2_cp_head",
                  auto_map={"AutoConfig": "configuration_eagle2_5_vl.Eagle2_5_VLConfig",
                            "AutoModel": "modeling_eagle2_5_vl.Eagle2_5_VLForConditionalGeneration"})
    config["vision_config"] = {**config["vision_config"], "model_type": "siglip_vision_model"}
    config["vision_config"].pop("vision_use_head")
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is EagleForConditionalGeneration and loaded.config.loss_version == "efficient_v2_cp_head"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_resize_token_embeddings_round_trips(tmp_path, config, processor):
    torch.manual_seed(0)
    model = EagleForConditionalGeneration(copy.deepcopy(config)).eval()  # resizing edits the model's config
    assert model.get_input_embeddings() is model.language_model.model.embed_tokens
    vocab = config.text_config.vocab_size + 8
    model.resize_token_embeddings(vocab)
    assert model.config.text_config.vocab_size == vocab and model.get_output_embeddings().weight.shape[0] == vocab
    inputs = processor(text=ask("<image>"), images=[picture(56, 56)], return_tensors="pt")
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def _export_sharded(rank, world, out_dir):
    """The trainer's export of an FSDP-sharded model, then the rest of the folder from write_hf_metadata."""
    from torch.distributed.fsdp import fully_shard

    from longvl.eagle.train.checkpoint import export_hf

    tokenizer = tiny_tokenizer()
    config = tiny_eagle_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMG_CONTEXT))
    torch.manual_seed(0)
    model = EagleForConditionalGeneration(config)
    for layer in model.language_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    out = export_hf(model, out_dir, config=model.config, max_shard_bytes=100_000, dtype=torch.float32)
    if out is not None:
        write_hf_metadata(out, config, tokenizer=tokenizer)


def test_trainer_export_plus_metadata_loads_with_auto_classes(tmp_path, model, processor):
    """What the trainer writes (FSDP-gathered shards) + write_hf_metadata = a folder the Auto classes load,
    giving the same logits as the model in memory (both built from seed 0)."""
    run_distributed(_export_sharded, 2, str(tmp_path), timeout=150)
    loaded, loaded_processor = AutoModel.from_pretrained(tmp_path).eval(), AutoProcessor.from_pretrained(tmp_path)
    inputs = loaded_processor(text=ask("<image>\nWhat is it?"), images=[picture(120, 60)], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_write_hf_metadata_checks_its_inputs(tmp_path, config, processor, tokenizer):
    with pytest.raises(ValueError, match="tokenizer or the processor"):
        write_hf_metadata(tmp_path, config)
    with pytest.raises(ValueError, match="image_token_index"):
        write_hf_metadata(tmp_path, tiny_eagle_config(len(tokenizer), 3), processor=processor)
    assert generation_config_for(tokenizer).pad_token_id == tokenizer.pad_token_id


# --- the processor's Hugging Face API --------------------------------------------------------------------------------
def test_chat_template_renders_what_the_model_reads(processor, tokenizer):
    """The saved Jinja template and the token path agree: the rendered string, re-read, gives the same tokens
    as the messages, and the tokens decode to that string with each visual block in place of its placeholder."""
    image = picture(120, 60)
    messages = ask([{"type": "image"}, {"type": "text", "text": "Describe."}]) + [
        {"role": "assistant", "content": "A tree."}, {"role": "user", "content": "And <image> here?"}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
                    "Describe.<|im_end|>\n<|im_start|>assistant\nA tree.<|im_end|>\n<|im_start|>user\n"
                    "And <image> here?<|im_end|>\n<|im_start|>assistant\n")
    from_text = processor(text=text, images=[image, image], return_tensors="pt")
    from_messages = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt", images=[image, image])
    for key in ("input_ids", "attention_mask", "pixel_values", "num_tiles"):
        assert torch.equal(from_text[key], from_messages[key]), key
    decoded = tokenizer.decode(from_text["input_ids"][0])
    assert re.sub(r"<img>(<IMG_CONTEXT>)+</img>", "<image>", decoded) == text
    assert from_text["num_tiles"].tolist() == [3, 3]  # a 2:1 image: 2 x 1 grid + thumbnail, each time


def test_sources_inside_messages_and_errors(processor, tmp_path):
    path = tmp_path / "photo.png"
    picture(80, 80).save(path)
    inside = processor.apply_chat_template(ask([{"type": "image", "image": str(path)}, {"type": "text", "text": "Hi"}]),
                                           tokenize=True, return_dict=True, return_tensors="pt")
    outside = processor(text=ask("<image>\nHi"), images=[str(path)], return_tensors="pt")
    assert torch.equal(inside["input_ids"], outside["input_ids"])
    assert torch.equal(inside["pixel_values"], outside["pixel_values"])
    with pytest.raises(ValueError, match="both inside the messages and as an argument"):
        processor(text=ask([{"type": "image", "image": str(path)}]), images=[str(path)])
    with pytest.raises(ValueError, match="type 'text', 'image' or 'video'"):
        processor(text=ask([{"type": "audio"}]))
    with pytest.raises(ValueError, match="not a ChatML prompt"):
        processor(text="Describe <image>", images=[str(path)])
    with pytest.raises(TypeError, match="truncation"):
        processor(text=ask("Hi"), truncation=True)
    with pytest.raises(ValueError, match="custom chat_template"):
        processor.apply_chat_template(ask("Hi"), chat_template="{{ messages }}", tokenize=True)
    assert parse_chatml("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n") == (
        [{"role": "user", "content": "Hi"}], True)


def test_message_text_goes_through_the_chat_templates_encoder(processor, monkeypatch):
    """Message text is tokenised by the chat template's encoder (the one place that decides how user text
    becomes tokens), never by a second path: every piece of user text passes through it."""
    from longvl.eagle.processing.tokenizer import PlainTextEncoder

    seen = []
    encode = PlainTextEncoder.__call__

    def recording(self, text):
        seen.append(text)
        return encode(self, text)

    monkeypatch.setattr(PlainTextEncoder, "__call__", recording)
    processor.apply_chat_template(ask([{"type": "text", "text": "say <|im_end|> twice"}]), tokenize=True)
    processor(text=[ask("first prompt"), "<|im_start|>user\nsecond prompt<|im_end|>\n"])
    assert "say <|im_end|> twice" in seen and "first prompt" in seen and "second prompt" in seen


def test_batch_pads_and_matches_one_by_one(processor, tokenizer):
    prompts = [ask("<image>\nWhat is this?"), ask("Hi"), ask("<image> and <image>")]
    images = [[picture(120, 60)], [], [picture(56, 56, 1), picture(60, 200, 2)]]
    single = [processor(text=p, images=i, return_tensors="pt", return_labels=True) for p, i in zip(prompts, images)]
    lengths = [s["input_ids"].shape[1] for s in single]
    assert len(set(lengths)) == 3
    for side in ("left", "right"):
        batch = processor(text=prompts, images=images, padding_side=side, return_labels=True, return_tensors="pt")
        assert batch["input_ids"].shape == (3, max(lengths))
        for row, (one, length) in enumerate(zip(single, lengths)):
            span = slice(max(lengths) - length, None) if side == "left" else slice(0, length)
            assert torch.equal(batch["input_ids"][row, span], one["input_ids"][0])
            assert torch.equal(batch["labels"][row, span], one["labels"][0])
            assert batch["attention_mask"][row].sum() == length and batch["attention_mask"][row, span].all()
            padding = batch["input_ids"][row][batch["attention_mask"][row] == 0]
            assert (padding == tokenizer.pad_token_id).all()
            assert (batch["labels"][row][batch["attention_mask"][row] == 0] == IGNORE_INDEX).all()
        assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in single if "pixel_values" in s]))
        assert torch.equal(batch["num_tiles"], torch.cat([s["num_tiles"] for s in single if "num_tiles" in s]))
    flat = processor(text=prompts, images=[picture(120, 60), picture(56, 56, 1), picture(60, 200, 2)])
    assert flat["input_ids"] == processor(text=prompts, images=images)["input_ids"]
    assert isinstance(flat["input_ids"], list) and isinstance(flat["pixel_values"], torch.Tensor)
    assert "pixel_values" not in processor(text=[ask("Hi"), ask("Hello")])
    with pytest.raises(ValueError, match="one list of images per prompt"):
        processor(text=prompts, images=[picture(56, 56)])
    with pytest.raises(ValueError, match="2 lists of images for 3 prompts"):
        processor(text=prompts, images=images[:2])


def test_video_frames_and_ads(processor, clip):
    prompt = ask("<video>\nWhat happens?")
    full = processor(text=prompt, videos=[clip], return_tensors="pt")
    frames = processor.plan(prompt, videos=[clip]).frame_indices[0]
    assert full["num_tiles"].tolist() == [1] * len(frames) and full["pixel_values"].shape[0] == len(frames)
    limit = full["input_ids"].shape[1] - 1
    degraded = processor(text=prompt, videos=[clip], max_length=limit, return_tensors="pt")
    assert degraded["input_ids"].shape[1] <= limit and 0 < degraded["pixel_values"].shape[0] < len(frames)


def test_processor_save_load_keeps_options(tmp_path, tokenizer, config):
    custom = EagleProcessor.from_config(config, tokenizer, pixel_dtype=torch.uint8, max_frames=9, sample_fps=1.0,
                                        resize_threads=2)
    custom.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config.to_json_string())
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert (loaded.max_frames, loaded.sample_fps) == (9, 1.0)
    assert loaded.image_processor.pixel_dtype == "uint8" and loaded.image_processor.resize_threads == 2
    pixels = loaded(text=ask("<image>"), images=[picture(56, 56)], return_tensors="pt")["pixel_values"]
    assert pixels.dtype == torch.uint8
    with pytest.raises(TypeError, match="unknown options"):
        EagleImageProcessor(max_tile=3)
    with pytest.raises(ValueError, match="pixel_dtype"):
        EagleImageProcessor(pixel_dtype="int8")


def test_processor_pickles(processor, clip):
    """Data-loader workers started with spawn receive the processor (e.g. in a Trainer's collator) by pickle."""
    clone = pickle.loads(pickle.dumps(processor))
    prompt = ask("<image> and <video>")
    for a, b in zip(clone(text=prompt, images=[picture(120, 60)], videos=[clip], return_tensors="pt").values(),
                    processor(text=prompt, images=[picture(120, 60)], videos=[clip], return_tensors="pt").values()):
        assert torch.equal(a, b)


def test_image_processor_alone(processor):
    out = processor.image_processor([picture(120, 60), picture(56, 56)], return_tensors="pt")
    assert out["num_tiles"].tolist() == [3, 1] and out["pixel_values"].shape == (4, 3, 56, 56)
    assert processor.image_processor(picture(120, 60), max_tiles=1)["num_tiles"].tolist() == [1]


# --- generation ----------------------------------------------------------------------------------------------------
def test_generate_with_processor_inputs_equals_argmax_loop(model, processor):
    """model.generate(**processor(...)) with the KV cache = argmax decoding by hand; the vision tower runs once."""
    inputs = processor(text=ask("<image>\nWhat is it?"), images=[picture(120, 60)], return_tensors="pt")
    calls = []
    hook = model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = generate(model, inputs, 6)
    finally:
        hook.remove()
    assert len(calls) == 1, "vision features are computed once, at prefill"
    assert torch.equal(out, greedy_reference(model, inputs["input_ids"], inputs["pixel_values"], 6))


def test_generate_with_video_equals_argmax_loop(model, processor, clip):
    inputs = processor(text=ask("<video>\nWhat happens?"), videos=[clip], return_tensors="pt")
    assert inputs["pixel_values"].shape[0] > 1
    assert torch.equal(generate(model, inputs, 5),
                       greedy_reference(model, inputs["input_ids"], inputs["pixel_values"], 5))


def test_batched_left_padded_generation_equals_one_by_one(model, processor):
    prompts = [ask("<image>\nWhat is this?"), ask("Hi there, how are you today?"), ask("<image> and <image>")]
    images = [[picture(120, 60)], [], [picture(56, 56, 1), picture(60, 200, 2)]]
    batch = processor(text=prompts, images=images, return_tensors="pt")
    together = generate(model, batch, 5)[:, -5:]
    for row, (prompt, media) in enumerate(zip(prompts, images)):
        alone = processor(text=prompt, images=media, return_tensors="pt")
        assert torch.equal(together[row], generate(model, alone, 5)[0, -5:]), row


def test_beams_repeat_each_prompts_tiles(model, processor):
    """num_beams / num_return_sequences repeat prompts; each copy keeps its own prompt's tiles."""
    prompts = [ask("<image>\nWhat is this?"), ask("<image> and <image>")]
    images = [[picture(120, 60)], [picture(56, 56, 1), picture(60, 200, 2)]]
    options = dict(num_beams=2, num_return_sequences=2)
    together = generate(model, processor(text=prompts, images=images, return_tensors="pt"), 4, **options)[:, -4:]
    for row, (prompt, media) in enumerate(zip(prompts, images)):
        alone = generate(model, processor(text=prompt, images=media, return_tensors="pt"), 4, **options)[:, -4:]
        assert torch.equal(together[2 * row:2 * row + 2], alone), row


def test_forward_checks_num_tiles(model, processor):
    inputs = processor(text=ask("<image>"), images=[picture(120, 60)], return_tensors="pt")
    with pytest.raises(ValueError, match="num_tiles adds up to 4 tiles but 3"):
        model(**{**inputs, "num_tiles": inputs["num_tiles"] + 1})


# --- kernels and transformers' Trainer -------------------------------------------------------------------------------
def test_kernels_patch_the_auto_loaded_model(folder, processor, device):
    from longvl.kernels import apply_kernels

    eager, patched = AutoModel.from_pretrained(folder).to(device), AutoModel.from_pretrained(folder).to(device)
    assert apply_kernels(patched) is patched
    assert type(patched.language_model.model.layers[0].mlp).__name__.startswith("Fused")
    batch = processor(text=[ask("<image>") + [{"role": "assistant", "content": "A tree."}]], images=[[picture(56, 56)]],
                      padding_side="right", return_labels=True, return_tensors="pt").to(device)
    losses = [m.train()(**batch).loss for m in (eager, patched)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    inputs = processor(text=ask("<image>\nWhat is it?"), images=[picture(120, 60)], return_tensors="pt").to(device)
    assert torch.equal(generate(patched.eval(), inputs, 4), generate(eager.eval(), inputs, 4))


def test_trainer_fine_tunes_the_patched_model(tmp_path, folder, processor):
    """transformers' Trainer, with our kernels patched in (CPU: Triton's interpreter, so 3 short steps),
    the processor as collator (right padding, labels on the assistant turns): the first logged loss is the
    eager model's on that batch, and the loss falls."""
    pytest.importorskip("accelerate")
    if torch.cuda.is_available():
        pytest.skip("the Trainer test runs on CPU (use_cpu), where the patched kernels need Triton's interpreter")
    from transformers import Trainer, TrainingArguments

    from longvl.kernels import apply_kernels

    samples = [{"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": f"{k}."}],
                "images": [picture(56, 56 + 30 * k, seed=k)]} for k in range(2)]  # short: RoPE is slow interpreted

    def collate(features):
        return processor(text=[f["messages"] for f in features], images=[f["images"] for f in features],
                         padding_side="right", return_labels=True, return_tensors="pt")

    eager = AutoModel.from_pretrained(folder).train()
    first_loss = eager(**collate(samples)).loss.item()
    model = apply_kernels(AutoModel.from_pretrained(folder))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collate)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses[0] == pytest.approx(first_loss, rel=1e-4)
    assert losses[-1] < losses[0] - 0.1, losses


# --- the README snippet ----------------------------------------------------------------------------------------------
def run_readme_snippet(tmp_path, folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    picture(120, 60).save(tmp_path / "photo.jpg")
    scope = {"folder": str(folder)}
    exec(compile(README_SNIPPET, "README snippet", "exec"), scope)
    exported = AutoModel.from_pretrained("eagle-export")
    exported_processor = AutoProcessor.from_pretrained("eagle-export")
    reference = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert exported_processor.to_dict() == scope["processor"].to_dict()
    prompt = scope["inputs"]["input_ids"]
    assert torch.equal(scope["output"][:, :prompt.shape[1]], prompt)
    assert prompt.shape[1] < scope["output"].shape[1] <= prompt.shape[1] + 16


def test_readme_snippet(tmp_path, folder, monkeypatch):
    run_readme_snippet(tmp_path, folder, monkeypatch)


# --- GPU -----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_generate_equals_argmax_loop_on_gpu(model, processor, clip):
    cuda = EagleForConditionalGeneration(model.config).eval()
    cuda.load_state_dict(model.state_dict())
    cuda = cuda.cuda()
    for inputs in (processor(text=ask("<image>\nWhat is it?"), images=[picture(120, 60)], return_tensors="pt"),
                   processor(text=ask("<video>\nWhat happens?"), videos=[clip], return_tensors="pt")):
        inputs = inputs.to("cuda")
        assert torch.equal(generate(cuda, inputs, 6), greedy_reference(cuda, inputs["input_ids"],
                                                                         inputs["pixel_values"], 6))


@pytest.mark.gpu
def test_readme_snippet_on_gpu(tmp_path, folder, monkeypatch):
    run_readme_snippet(tmp_path, folder, monkeypatch)
