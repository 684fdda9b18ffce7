"""ChatML conversations with `<image>` / `<video>` placeholders -> token ids and labels.

Each turn is `<|im_start|>{role}\\n{content}<|im_end|>\\n`. An image becomes `<img>` + `<IMG_CONTEXT>` x
(tokens_per_tile x tiles) + `</img>`; a video becomes one line per frame, `Frame {k} at {t:.2f}s: <img>...</img>`
followed by a newline, with one tile per frame. Labels cover assistant text and its `<|im_end|>`, nothing else.

Text is tokenised once, piece by piece between placeholders, so its length never depends on the visual
content: Automatic Degrade Sampling can price visual content separately and exactly. Content is text and
only text (`PlainTextEncoder`): `<|im_end|>`, `<IMG_CONTEXT>` or `<img>` typed by a user or written in an
answer are tokenised as characters; control and image tokens come from the template alone.
"""
import dataclasses
import re
from functools import lru_cache

from longvl.eagle.processing.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, PlainTextEncoder

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_PLACEHOLDER = re.compile(r"(<image>|<video>)")


@dataclasses.dataclass
class TokenizedTurn:
    role: str
    parts: list  # token-id lists (text) and ("image" | "video", index) markers, in order


class ChatTemplate:
    def __init__(self, tokenizer, tokens_per_tile: int):
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        ids = tokenizer.convert_tokens_to_ids([IMG_START, IMG_END, IMG_CONTEXT, "<|im_start|>", "<|im_end|>"])
        self.img_start, self.img_end, self.img_context, self.im_start, self.im_end = ids
        self.encode_text = PlainTextEncoder(tokenizer)  # str -> ids, never a control or image token
        self.newline = self.encode_text("\n")
        self.frame_prefix = lru_cache(maxsize=8192)(self._frame_prefix)

    def _frame_prefix(self, number: int, seconds: str) -> tuple[int, ...]:
        return tuple(self.encode_text(f"Frame {number} at {seconds}s: "))

    # --- conversation -> turns ----------------------------------------------------------------------------------
    def split(self, messages, num_images: int, num_videos: int) -> list[TokenizedTurn]:
        """Validate the conversation and tokenise its text; media without placeholders go first in the first
        user turn (images, then videos), so plain `[{"role": "user", "content": "Describe."}]` works."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': str} dicts")
        for number, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise ValueError(f"message {number} needs a role in {ROLES}, got {message!r:.80}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"message {number} content must be a string with <image>/<video> placeholders")
        counts = {kind: sum(m["content"].count(f"<{kind}>") for m in messages) for kind in ("image", "video")}
        prefix = ""
        for kind, given in (("image", num_images), ("video", num_videos)):
            if counts[kind] == 0 and given:
                prefix += f"<{kind}>\n" * given
            elif counts[kind] != given:
                raise ValueError(f"{counts[kind]} <{kind}> placeholders in the conversation but {given} {kind}s given")
        first_user = next((n for n, m in enumerate(messages) if m["role"] == "user"), None)
        if prefix and first_user is None:
            raise ValueError("media given without placeholders and no user turn to attach them to")
        turns, seen = [], {"image": 0, "video": 0}
        for number, message in enumerate(messages):
            content = prefix + message["content"] if number == first_user else message["content"]
            parts = []
            for piece in _PLACEHOLDER.split(content):
                if piece in ("<image>", "<video>"):
                    kind = piece[1:-1]
                    parts.append((kind, seen[kind]))
                    seen[kind] += 1
                elif piece:
                    parts.append(self.encode_text(piece))
            turns.append(TokenizedTurn(message["role"], parts))
        return turns

    def _header(self, role: str) -> list[int]:
        return [self.im_start] + self.encode_text(f"{role}\n")

    def text_length(self, turns, add_generation_prompt: bool) -> int:
        """Tokens of everything except visual blocks."""
        length = sum(len(self._header(t.role)) + 1 + len(self.newline) for t in turns)
        length += sum(len(p) for t in turns for p in t.parts if isinstance(p, list))
        return length + (len(self._header("assistant")) if add_generation_prompt else 0)

    # --- visual blocks ------------------------------------------------------------------------------------------
    def image_block(self, tiles: int) -> list[int]:
        return [self.img_start] + [self.img_context] * (self.tokens_per_tile * tiles) + [self.img_end]

    def image_length(self, tiles: int) -> int:
        return self.tokens_per_tile * tiles + 2

    def video_block(self, timestamps) -> list[int]:
        ids = []
        for number, seconds in enumerate(timestamps, start=1):
            ids += self.frame_prefix(number, f"{seconds:.2f}")
            ids += self.image_block(1) + self.newline
        return ids

    def video_length(self, timestamps) -> int:
        per_frame = self.image_length(1) + len(self.newline)
        return sum(len(self.frame_prefix(n, f"{s:.2f}")) + per_frame for n, s in enumerate(timestamps, start=1))

    # --- render -------------------------------------------------------------------------------------------------
    def render(self, turns, image_tiles, video_timestamps, add_generation_prompt: bool):
        """(input_ids, labels) as lists; labels are IGNORE_INDEX except assistant text and its <|im_end|>."""
        input_ids, labels = [], []

        def emit(ids, supervised):
            input_ids.extend(ids)
            labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

        for turn in turns:
            assistant = turn.role == "assistant"
            emit(self._header(turn.role), False)
            for part in turn.parts:
                if isinstance(part, list):
                    emit(part, assistant)
                elif part[0] == "image":
                    emit(self.image_block(image_tiles[part[1]]), False)
                else:
                    emit(self.video_block(video_timestamps[part[1]]), False)
            emit([self.im_end], assistant)
            emit(self.newline, False)
        if add_generation_prompt:
            emit(self._header("assistant"), False)
        return input_ids, labels

    @staticmethod
    def media_order(turns) -> list[tuple[str, int]]:
        """("image" | "video", index) in the order their tokens appear: the order of pixel_values."""
        return [p for t in turns for p in t.parts if isinstance(p, tuple)]
