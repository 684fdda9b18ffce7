"""EagleProcessor: the Hugging Face processor of Eagle 2.5 (tokenizer + EagleImageProcessor + video sampling).

One implementation serves both users of it:
- Hugging Face style: `processor(text=..., images=..., videos=..., return_tensors="pt")` and
  `processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)` give a
  `BatchFeature` for `model(**inputs)` / `model.generate(**inputs)`; `save_pretrained` / `AutoProcessor`.
- The training data pipeline: `process(messages, images, videos, max_length)` gives one sample's tokens,
  labels, tiles and its `SamplePlan`; `plan(...)` gives the same plan from image headers and video metadata
  only (the offline index uses it to get exact lengths cheaply).

A conversation is `[{"role": "system" | "user" | "assistant", "content": ...}, ...]`; content is a string in
which `<image>` / `<video>` mark where the k-th image / video goes (without placeholders, media go first in
the first user turn), or a list of items `{"type": "text", "text": ...}`, `{"type": "image"[, "image": src]}`,
`{"type": "video"[, "video": src]}` as transformers' chat templates use. Images are paths, bytes or PIL images;
videos are paths, or VideoMeta from an earlier plan (e.g. kept in the data index), which skips re-reading the
container. Text is ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n`; an image becomes `<img>` +
`<IMG_CONTEXT>` x tokens_per_tile x tiles + `</img>`, a video one such block per frame with its timestamp.

Conversations are tokenised turn by turn through the chat template's own encoder, so message text is never
parsed into the turn structure. A prompt given as a string is ChatML that the caller wrote (e.g. with
`apply_chat_template(tokenize=False)`): its `<|im_start|>` / `<|im_end|>` markers are read as turn
boundaries, so text from untrusted users belongs in messages, not in a string.

`max_length` applies Automatic Degrade Sampling per sample: the text is never cut; video frames, then image
tiles, are reduced until the sample fits, and SampleTooLongError says when even the text does not.
"""
import dataclasses
import re

import torch
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

from longvl.eagle.image_processing_eagle import EagleImageProcessor
from longvl.eagle.processing.ads import DegradePlan, degrade_to_fit
from longvl.eagle.processing.errors import ImageLoadError
from longvl.eagle.processing.image_io import decoded_from, image_size, load_image
from longvl.eagle.processing.template import IGNORE_INDEX, ChatTemplate
from longvl.eagle.processing.tokenizer import IMG_CONTEXT
from longvl.eagle.processing.video import (DEFAULT_TIMEOUT_S, VideoMeta, check_frame_range, decode_frames,
                                           read_video_meta, sample_frame_indices)

# ChatML with transformers' content items: an image item becomes "<image>\n", a video item "<video>\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- elif item['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<video>\\n' -}}"
    "{%- else -%}{{- raise_exception('unknown content item type ' + item['type']) -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_ITEM_PLACEHOLDERS = {"image": "<image>\n", "video": "<video>\n"}
_ITEM_SOURCE_KEYS = {"image": ("image", "path", "url"), "video": ("video", "path", "url")}
_CHATML_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n?", re.DOTALL)
_GENERATION_PROMPT = "<|im_start|>assistant\n"


@dataclasses.dataclass
class SamplePlan:
    num_tokens: int
    text_tokens: int
    image_sizes: list           # (width, height) per image
    image_grids: list           # (cols, rows) per image, after ADS
    image_tiles: list           # tiles per image incl. thumbnail, after ADS
    video_meta: list            # VideoMeta per video
    frame_indices: list         # per video: decoded frame indices, after ADS
    timestamps: list            # per video: seconds of each frame
    degrade: DegradePlan
    degraded: dict              # {"images": [(i, tiles_before, tiles_after)], "videos": [(v, frames_before, after)]}

    @property
    def num_image_tiles(self) -> int:
        return sum(self.image_tiles) + sum(len(f) for f in self.frame_indices)


@dataclasses.dataclass
class ProcessedSample:
    """One conversation, ready for the model and the loss."""

    input_ids: torch.Tensor     # (L,) long: visual blocks expanded
    labels: torch.Tensor        # (L,) long: token ids on assistant text and its <|im_end|>, IGNORE_INDEX elsewhere
    pixel_values: torch.Tensor  # (N, 3, s, s): every tile in token order (N may be 0), in the pixel dtype
    num_tiles: torch.Tensor     # (blocks,) long: tiles per <img> block in token order (an image's, 1 per frame)
    plan: SamplePlan


def parse_chatml(text: str) -> tuple[list[dict], bool]:
    """A ChatML prompt string -> (messages, whether it ends with the assistant generation prompt)."""
    messages, position = [], 0
    while position < len(text):
        turn = _CHATML_TURN.match(text, position)
        if turn:
            messages.append({"role": turn[1], "content": turn[2]})
            position = turn.end()
        elif text[position:] == _GENERATION_PROMPT:
            return messages, True
        else:
            raise ValueError(f"text is not a ChatML prompt at character {position} ({text[position:position + 40]!r}): "
                             "write it with processor.apply_chat_template(messages, tokenize=False), or pass the "
                             "messages themselves")
    return messages, False


def _message_text(message, number: int) -> tuple[dict, list, list]:
    """A message whose content may be a list of items -> (message with string content, its images, videos)."""
    if not isinstance(message, dict):
        raise ValueError(f"message {number} must be a dict with 'role' and 'content', got {type(message).__name__}")
    content = message.get("content")
    if isinstance(content, str) or not isinstance(content, (list, tuple)):
        return message, [], []  # a string, or something the chat template rejects with its own message
    text, media = [], {"image": [], "video": []}
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            text.append(item["text"])
        elif kind in _ITEM_PLACEHOLDERS:
            text.append(_ITEM_PLACEHOLDERS[kind])
            source = next((item[key] for key in _ITEM_SOURCE_KEYS[kind] if item.get(key) is not None), None)
            media[kind].append(source)
        else:
            raise ValueError(f"message {number}: content items need type 'text', 'image' or 'video', got {item!r:.80}")
    return {**message, "content": "".join(text)}, media["image"], media["video"]


def _as_list(media) -> list:
    if media is None:
        return []
    return list(media) if isinstance(media, (list, tuple)) else [media]


def _per_prompt(media, counts: list[int], kind: str) -> list[list]:
    """The `images` / `videos` argument -> one list per prompt: a list per prompt as given, or a flat list
    shared out in placeholder order (the only choice for one prompt)."""
    media = _as_list(media)
    if media and all(isinstance(m, (list, tuple)) for m in media):
        if len(media) != len(counts):
            raise ValueError(f"{len(media)} lists of {kind}s for {len(counts)} prompts")
        return [list(m) for m in media]
    if len(counts) == 1:
        return [media]
    if sum(counts) != len(media):
        raise ValueError(f"{len(media)} {kind}s for a batch whose prompts have {counts} <{kind}> placeholders: "
                         f"pass one list of {kind}s per prompt")
    starts = [sum(counts[:k]) for k in range(len(counts))]
    return [media[start:start + count] for start, count in zip(starts, counts)]


@dataclasses.dataclass
class _Prompt:
    """One prompt of a call: messages with string content, and the media its content items name."""

    messages: list
    add_generation_prompt: bool
    item_images: list           # sources named by image items, None for an item that names none
    item_videos: list

    @classmethod
    def read(cls, prompt, add_generation_prompt: bool) -> "_Prompt":
        """A ChatML string (which carries its own generation prompt) or a conversation."""
        if isinstance(prompt, str):
            messages, add_generation_prompt = parse_chatml(prompt)
        elif isinstance(prompt, (list, tuple)):
            messages = prompt
        else:
            raise ValueError(f"a prompt is a ChatML string or a list of messages, got {type(prompt).__name__}")
        converted = [_message_text(message, number) for number, message in enumerate(messages)]
        return cls([message for message, _, _ in converted], add_generation_prompt,
                   [source for _, found, _ in converted for source in found],
                   [source for _, _, found in converted for source in found])

    def placeholders(self, kind: str) -> int:
        return sum(m["content"].count(f"<{kind}>") for m in self.messages if isinstance(m.get("content"), str))


class EagleProcessor(ProcessorMixin):
    """Tokenizer + EagleImageProcessor + video sampling and ADS; see the module docstring.

    `EagleProcessor(tokenizer, **image_options)` builds the image processor from EagleImageProcessor's options
    (tile_size, min_tiles, max_tiles, use_thumbnail, dynamic_image_size, pixel_dtype, resize_threads,
    max_image_pixels);
    `EagleProcessor.from_config(config, tokenizer)` takes the tile geometry from a model config.
    """

    # The chat-template encoder holds the tokenizer: a slot keeps it out of __dict__, which save_pretrained copies.
    __slots__ = ("_template",)

    def __init__(self, tokenizer=None, image_processor=None, chat_template=None, tokens_per_tile: int = 256,
                 sample_fps: float = 2.0, min_frames: int = 8, max_frames: int = 128, video_backend: str = "auto",
                 decode_timeout_s: float = DEFAULT_TIMEOUT_S, **image_options):
        if tokenizer is None:
            raise ValueError("EagleProcessor needs a tokenizer with the ChatML and Eagle image tokens "
                             "(longvl.eagle.processing.tokenizer.load_tokenizer)")
        if image_processor is None:
            image_processor = EagleImageProcessor(**image_options)
        elif image_options:
            raise TypeError(f"options {sorted(image_options)} belong to the image processor, which was given")
        check_frame_range(min_frames, max_frames)
        super().__init__(tokenizer, image_processor, chat_template=chat_template or CHAT_TEMPLATE)
        self.tokens_per_tile = tokens_per_tile
        self.sample_fps, self.min_frames, self.max_frames = sample_fps, min_frames, max_frames
        self.video_backend, self.decode_timeout_s = video_backend, decode_timeout_s
        self._template = ChatTemplate(tokenizer, tokens_per_tile)
        self.image_token = IMG_CONTEXT
        self.image_token_id = self._template.img_context

    def __getstate__(self):  # pickling (spawned data-loader workers): the encoder is rebuilt, not pickled
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._template = ChatTemplate(self.tokenizer, self.tokens_per_tile)

    @classmethod
    def from_config(cls, config, tokenizer, **options):
        """Tile size, tokens per tile and tiling options from an EagleConfig; other options as keywords."""
        token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        if token_id != config.image_token_index:
            raise ValueError(f"tokenizer's {IMG_CONTEXT} id is {token_id} but the model's image_token_index is "
                             f"{config.image_token_index}")
        return cls(tokenizer, tokens_per_tile=config.tokens_per_tile, tile_size=config.force_image_size,
                   min_tiles=config.min_dynamic_tiles, max_tiles=config.max_dynamic_tiles,
                   use_thumbnail=config.use_thumbnail, dynamic_image_size=config.dynamic_image_size, **options)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "num_tiles"]

    # --- one conversation: plan and process ---------------------------------------------------------------------
    def _frames(self, meta: VideoMeta, frame_cap: int) -> list[int]:
        return sample_frame_indices(meta.num_frames, meta.fps, self.sample_fps,
                                    min(self.min_frames, frame_cap), min(self.max_frames, frame_cap))

    @staticmethod
    def _timestamps(meta: VideoMeta, indices) -> list[float]:
        return [index / meta.fps for index in indices]

    def plan(self, messages, images=(), videos=(), max_length: int | None = None,
             add_generation_prompt: bool = False) -> SamplePlan:
        """Token count and every visual choice, from image headers and video metadata only."""
        return self._plan(messages, list(images), list(videos), max_length, add_generation_prompt)[0]

    def _plan(self, messages, images, videos, max_length, add_generation_prompt):
        tiles_of = self.image_processor.count_tiles
        turns = self._template.split(messages, len(images), len(videos))
        sizes = [image_size(source, self.image_processor.max_image_pixels) for source in images]
        metas = [v if isinstance(v, VideoMeta) else read_video_meta(v, self.video_backend, self.decode_timeout_s)
                 for v in videos]
        text = self._template.text_length(turns, add_generation_prompt)

        def visual_tokens(frame_cap, tile_cap):
            tokens = sum(self._template.image_length(tiles_of(size, tile_cap)) for size in sizes)
            for meta in metas:
                tokens += self._template.video_length(self._timestamps(meta, self._frames(meta, frame_cap)))
            return tokens

        tile_limit = self.image_processor.tile_limit
        degrade = degrade_to_fit(max_length, text, visual_tokens, self.max_frames, tile_limit,
                                 has_videos=bool(metas), has_images=bool(sizes))
        tiles = [tiles_of(size, degrade.tile_cap) for size in sizes]
        frames = [self._frames(meta, degrade.frame_cap) for meta in metas]
        full_tiles = [tiles_of(size, tile_limit) for size in sizes]
        full_frames = [len(self._frames(meta, self.max_frames)) for meta in metas]
        degraded = {
            "images": [(i, a, b) for i, (a, b) in enumerate(zip(full_tiles, tiles)) if a != b],
            "videos": [(v, a, len(b)) for v, (a, b) in enumerate(zip(full_frames, frames)) if a != len(b)],
        }
        plan = SamplePlan(num_tokens=degrade.total_tokens, text_tokens=text, image_sizes=sizes,
                          image_grids=[self.image_processor.grid(size, degrade.tile_cap) for size in sizes],
                          image_tiles=tiles, video_meta=metas, frame_indices=frames,
                          timestamps=[self._timestamps(m, f) for m, f in zip(metas, frames)],
                          degrade=degrade, degraded=degraded)
        return plan, turns

    def process(self, messages, images=(), videos=(), max_length: int | None = None,
                add_generation_prompt: bool = False) -> ProcessedSample:
        """One conversation -> tokens, labels and tiles (SampleTooLongError / MediaError when it cannot be)."""
        images, videos = list(images), list(videos)
        plan, turns = self._plan(messages, images, videos, max_length, add_generation_prompt)
        input_ids, labels = self._template.render(turns, plan.image_tiles, plan.timestamps, add_generation_prompt)
        if len(input_ids) != plan.num_tokens:
            raise RuntimeError(f"rendered {len(input_ids)} tokens but planned {plan.num_tokens}")
        blocks, num_tiles = [], []
        for kind, index in self._template.media_order(turns):
            if kind == "image":
                blocks.append(self._image_tiles(images[index], plan, index))
                num_tiles.append(len(blocks[-1]))
            else:
                meta = plan.video_meta[index]
                frames, _ = decode_frames(meta.path, plan.frame_indices[index], self.video_backend,
                                          self.decode_timeout_s)
                blocks.append(self.image_processor.frame_tiles(frames))
                num_tiles += [1] * len(blocks[-1])
        return ProcessedSample(input_ids=torch.tensor(input_ids, dtype=torch.long),
                               labels=torch.tensor(labels, dtype=torch.long),
                               pixel_values=self.image_processor.pixel_values(blocks),
                               num_tiles=torch.tensor(num_tiles, dtype=torch.long), plan=plan)

    def _image_tiles(self, source, plan: SamplePlan, index: int):
        cols, rows = plan.image_grids[index]
        side = self.image_processor.tile_size
        image = load_image(source, (cols * side, rows * side), self.image_processor.max_image_pixels)
        if not decoded_from(image.size, plan.image_sizes[index]):
            raise ImageLoadError(f"image {index} decodes as {image.size} but its header says {plan.image_sizes[index]}")
        return self.image_processor.image_tiles(image, plan.image_grids[index])

    # --- Hugging Face API ---------------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, videos=None, *, add_generation_prompt: bool = False,
                 max_length: int | None = None, padding=True, padding_side: str = "left", return_labels: bool = False,
                 return_tensors=None, **unsupported) -> BatchFeature:
        """Prompts and their media -> BatchFeature(input_ids, attention_mask, pixel_values, num_tiles[, labels]).

        `text`: a ChatML string, a conversation (list of messages), or a list of either for a batch.
        `images` / `videos`: for one prompt, a list (or a single item); for a batch, one list per prompt, or a
        flat list shared out by the prompts' placeholders. `add_generation_prompt` applies to conversations
        (a string carries its own). `max_length`: ADS per prompt. Prompts of different lengths are padded to
        the longest on `padding_side` ("left" for generation, "right" for training). `return_labels` adds
        labels (assistant text and its <|im_end|>; IGNORE_INDEX elsewhere, padding included). pixel_values and
        num_tiles hold every prompt's tiles in order and are left out when there are none.
        """
        if unsupported:
            raise TypeError(f"EagleProcessor got unsupported arguments {sorted(unsupported)}")
        if text is None:
            raise ValueError("EagleProcessor needs text: a ChatML prompt, a conversation, or a list of them")
        if padding not in (True, "longest"):
            raise ValueError(f"EagleProcessor pads a batch to its longest prompt; padding={padding!r} is not supported")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        is_single = isinstance(text, str) or (isinstance(text, (list, tuple)) and bool(text)
                                               and isinstance(text[0], dict))
        prompts = [_Prompt.read(prompt, add_generation_prompt) for prompt in ([text] if is_single else text)]
        if not prompts:
            raise ValueError("text is an empty batch")
        images = self._media(images, [p.item_images for p in prompts], [p.placeholders("image") for p in prompts],
                             "image")
        videos = self._media(videos, [p.item_videos for p in prompts], [p.placeholders("video") for p in prompts],
                             "video")
        samples = [self.process(prompt.messages, images[k], videos[k], max_length, prompt.add_generation_prompt)
                   for k, prompt in enumerate(prompts)]
        return self._batch(samples, padding_side, return_labels, return_tensors)

    @staticmethod
    def _media(given, in_items: list[list], counts: list[int], kind: str) -> list[list]:
        """Media per prompt: from the content items, or else from the argument."""
        sourced = [[s for s in found if s is not None] for found in in_items]
        if any(sourced):
            if given is not None:
                raise ValueError(f"{kind}s given both inside the messages and as an argument")
            if any(len(s) != len(found) for s, found in zip(sourced, in_items)):
                raise ValueError(f"some {kind} items carry a source and others do not")
            return sourced
        return _per_prompt(given, counts, kind)

    def _batch(self, samples: list[ProcessedSample], padding_side: str, return_labels: bool,
               return_tensors) -> BatchFeature:
        longest = max(len(s.input_ids) for s in samples)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None and any(len(s.input_ids) < longest for s in samples):
            raise ValueError("prompts of different lengths need padding, but the tokenizer has no pad token")
        input_ids = torch.full((len(samples), longest), pad_id if pad_id is not None else 0, dtype=torch.long)
        attention_mask = torch.zeros(len(samples), longest, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample.input_ids)
            span = slice(longest - length, longest) if padding_side == "left" else slice(0, length)
            input_ids[row, span], attention_mask[row, span], labels[row, span] = sample.input_ids, 1, sample.labels
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_labels:
            data["labels"] = labels
        if any(len(s.num_tiles) for s in samples):
            data["pixel_values"] = torch.cat([s.pixel_values for s in samples])
            data["num_tiles"] = torch.cat([s.num_tiles for s in samples])
        if return_tensors is None:
            data = {k: v if k == "pixel_values" else v.tolist() for k, v in data.items()}
        return BatchFeature(data)

    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt: bool = False,
                            tokenize: bool = False, return_dict: bool = False, return_tensors=None, **kwargs):
        """ChatML text of one conversation or a batch (`tokenize=False`, rendered by the saved Jinja template),
        or model inputs (`tokenize=True`: the messages go through `__call__`, turn by turn, so their text never
        becomes control tokens); `return_dict=True` gives the whole BatchFeature, else the input_ids.
        Keywords such as images=, videos=, max_length=, padding_side= go to `__call__`."""
        if not tokenize:
            if kwargs:
                raise TypeError(f"apply_chat_template(tokenize=False) got unsupported arguments {sorted(kwargs)}")
            return super().apply_chat_template(conversation, chat_template=chat_template,
                                               add_generation_prompt=add_generation_prompt, tokenize=False)
        if chat_template is not None:
            raise ValueError("tokenised inputs always use Eagle's ChatML; a custom chat_template can only render "
                             "text (tokenize=False)")
        inputs = self(text=conversation, add_generation_prompt=add_generation_prompt, return_tensors=return_tensors,
                      **kwargs)
        return inputs if return_dict else inputs["input_ids"]
