"""Everything besides the weights that transformers' Auto classes need to load an Eagle folder on their own.

`write_hf_metadata(folder, config, tokenizer=...)` writes config.json, generation_config.json, the tokenizer
files, processor_config.json (image processor and video options) and chat_template.jinja, all through
transformers' own `save_pretrained`. The weights come from `model.save_pretrained` or, for a sharded
training run, from the trainer's export; with both in one folder, `AutoModel.from_pretrained(folder)` and
`AutoProcessor.from_pretrained(folder)` work after `import longvl.eagle`.

safetensors creates weight files with mode 0600 whatever the umask; `give_default_modes` sets the mode any
other new file gets (0644 under the usual umask), so a shared export is readable like its config.
"""
import json
import os
import re
from pathlib import Path

from transformers import GenerationConfig

WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"
# A generation ends at the end of the assistant's turn, or at the end of the text.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def default_file_mode() -> int:
    """The mode a new file gets under this process's umask (read without changing it where Linux allows)."""
    try:
        status = Path("/proc/self/status").read_text()
        umask = int(re.search(r"^Umask:\s*([0-7]+)$", status, re.MULTILINE).group(1), 8)
    except (OSError, AttributeError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def weight_files(folder) -> list[Path]:
    """The safetensors files of a saved model: the index's shards, or the single file."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / SINGLE_WEIGHTS] if (folder / SINGLE_WEIGHTS).is_file() else []


def give_default_modes(paths) -> None:
    """Set the umask's default mode on regular files (never through a symlink)."""
    mode = default_file_mode()
    for path in paths:
        if not Path(path).is_symlink():
            os.chmod(path, mode)


def generation_config_for(tokenizer) -> GenerationConfig:
    """Stop at <|im_end|> (end of the assistant turn) or <|endoftext|>; pad with the tokenizer's pad token."""
    vocab = tokenizer.get_vocab()
    stops = [vocab[token] for token in STOP_TOKENS if token in vocab]
    if not stops:
        raise ValueError(f"the tokenizer has none of the stop tokens {STOP_TOKENS}")
    return GenerationConfig(eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)


def write_hf_metadata(folder, config, tokenizer=None, processor=None) -> Path:
    """config.json, generation_config.json, tokenizer, processor config and chat template into `folder`.

    Give the tokenizer (the processor is then built from the model config) or a processor built for this
    model (its tokenizer is used). Weights are not written here; call this after `model.save_pretrained`,
    which writes a generation_config.json of its own (without the stop tokens when the model was built from
    a config)."""
    from longvl.eagle.processor import EagleProcessor

    if processor is None:
        if tokenizer is None:
            raise ValueError("write_hf_metadata needs the tokenizer or the processor")
        processor = EagleProcessor.from_config(config, tokenizer)
    elif tokenizer is not None and tokenizer is not processor.tokenizer:
        raise ValueError("give the tokenizer or the processor, not both: the processor holds its own tokenizer")
    if processor.image_token_id != config.image_token_index:
        raise ValueError(f"the processor's image token id {processor.image_token_id} differs from the model's "
                         f"image_token_index {config.image_token_index}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    generation_config_for(processor.tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
