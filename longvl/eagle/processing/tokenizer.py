"""Tokenizers: a local Qwen2.5 tokenizer folder, or a small byte-level BPE with the same special tokens.

The small one is trained here, in well under a second, on a built-in corpus: tests and the demo need no
download. Like Qwen2.5 it splits digits one by one and appends its special tokens after the BPE vocabulary,
in Qwen2.5's order, followed by Eagle's `<img>`, `</img>`, `<IMG_CONTEXT>`.

`PlainTextEncoder` encodes text as text: a user who types `<|im_end|><|im_start|>assistant` or
`<IMG_CONTEXT>` gets those characters, never the control or image tokens they spell.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
EAGLE_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)

# Qwen2's pre-tokenisation: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CORPUS = (
    "You are a helpful assistant. Describe the image in detail. What happens in this video? "
    "The picture shows a red car parked next to a tall building under a blue sky. "
    "A person walks across the street, then a dog runs after a ball in the park. "
    "Frame at seconds: the scene changes from day to night. Answer the question with a short sentence. "
    "How many objects are there? There are three apples and two oranges on the wooden table. "
    "The chart shows the sales of the company over the last ten years, growing every quarter."
)
TINY_VOCAB_SIZE = 512  # BPE entries before the special tokens


def build_tiny_tokenizer(folder, vocab_size: int = TINY_VOCAB_SIZE, eagle_tokens: bool = True):
    """Train the small byte-level BPE, save it as a Hugging Face tokenizer folder, and return it loaded.
    With `eagle_tokens=False` the folder has Qwen2.5's special tokens only, like a stock Qwen2.5 folder."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    special = QWEN2_5_SPECIAL_TOKENS + (EAGLE_TOKENS if eagle_tokens else ())
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      additional_special_tokens=list(special), model_max_length=1 << 20)
    wrapped.save_pretrained(folder)
    return load_tokenizer(folder)


def tiny_tokenizer():
    """The small tokenizer, built once per machine into a cache folder keyed by its recipe."""
    recipe = hashlib.sha1(f"{_CORPUS}{_SPLIT_PATTERN}{TINY_VOCAB_SIZE}{QWEN2_5_SPECIAL_TOKENS}".encode())
    folder = Path(tempfile.gettempdir()) / f"eagle_tiny_tokenizer_{recipe.hexdigest()[:12]}"
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + "_tmp", dir=folder.parent))
    build_tiny_tokenizer(scratch)
    try:
        os.replace(scratch, folder)  # atomic: parallel test workers never see a half-written folder
    except OSError:  # another process won the race; its folder is identical
        pass
    return load_tokenizer(folder)


def load_tokenizer(folder):
    """A local tokenizer folder (e.g. Qwen2.5's); Eagle's image tokens are added when the folder lacks them."""
    from transformers import AutoTokenizer

    if not (Path(folder) / "tokenizer_config.json").is_file() and not (Path(folder) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer files in {folder}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"tokenizer in {folder} lacks the ChatML tokens {missing}")
    absent = [t for t in EAGLE_TOKENS if t not in tokenizer.get_vocab()]
    if absent:
        tokenizer.add_special_tokens({"additional_special_tokens": absent}, replace_extra_special_tokens=False)
    return tokenizer


class PlainTextEncoder:
    """text -> token ids that never match an added token (special or not): the tokenizer's own normaliser,
    pre-tokeniser and BPE model on a copy with no added tokens -- what `split_special_tokens=True` does for
    special tokens, for every added token (Qwen2.5 marks `<tool_call>` and the FIM tokens non-special), in
    Rust, with any transformers version. Needs a fast (Rust-backed) tokenizer; picklable."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: content cannot be encoded with "
                            "a guarantee that it never becomes control tokens")
        recipe = json.loads(backend.to_str())
        recipe["added_tokens"] = []
        recipe["post_processor"] = None
        recipe["truncation"] = recipe["padding"] = None
        self.plain = Tokenizer.from_str(json.dumps(recipe))
        added = {token.content: index for index, token in backend.get_added_tokens_decoder().items()}
        reachable = [content for content, index in added.items() if self.plain.id_to_token(index) is not None]
        if reachable:
            raise ValueError(f"the tokenizer's base vocabulary holds its added tokens {reachable[:8]}: plain "
                             "text could produce them")

    def __call__(self, text: str) -> list[int]:
        return self.plain.encode(text, add_special_tokens=False).ids if text else []
