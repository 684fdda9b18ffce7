"""Conversation records: parse LLaVA-style and "messages"-style JSON into one validated form.

Every later stage (index, packing, processing) sees a `Record`, never raw JSON, so the checks that make a
sample trainable -- known roles, an assistant turn to supervise, placeholders matching the media, media
inside the data root and present on disk -- run in one place and fail with a `BadSample` naming the reason.
Whatever a record holds (an int where a list belongs, a list where a role belongs, a NUL byte in a path,
bytes that are not UTF-8), parsing it raises a `BadSample` and nothing else: one bad record is skipped and
counted, never the end of an index or a run. An annotation file that is unusable as a whole (a truncated or
non-list `.json` file) raises `AnnotationFileError`, naming the file and the position.
"""
import json
import os
from dataclasses import dataclass, field

from .bad_samples import BadSample

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"

# LLaVA "from" values and "messages" roles, mapped onto the ChatML roles the template writes.
_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant",
    "system": "system",
}


@dataclass
class Turn:
    role: str  # "system", "user" or "assistant"
    text: str  # may hold <image> / <video> placeholders, in media order


@dataclass
class Record:
    """One validated sample. Media paths are absolute and checked to lie inside the data root."""

    id: str
    turns: list
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)


class AnnotationFileError(ValueError):
    """A whole annotation file cannot be read; the message names the file and the position."""


def _media_list(value, key):
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise BadSample("malformed", f"{key!r} must be a path or a list of paths, got {type(value).__name__}")


def resolve_media(path, root, check_exists=True):
    """Absolute path of `path` under `root`; refuses paths that escape the root (also through symlinks)."""
    if "\x00" in path:
        raise BadSample("malformed", f"media path {path!r} contains a NUL byte")
    if os.path.isabs(path):
        raise BadSample("path_escape", f"absolute media path {path!r}")
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real_root, full]) != real_root:
        raise BadSample("path_escape", f"{path!r} resolves outside the data root")
    if check_exists and not os.path.isfile(full):
        raise BadSample("missing_file", f"{path!r} not found under {root}")
    return full


def _list_of_turns(value, key):
    if not isinstance(value, list):
        raise BadSample("malformed", f"{key!r} must be a list of turns, got {type(value).__name__}")
    return value


def _turns_from_conversations(conversations):
    turns = []
    for item in _list_of_turns(conversations, "conversations"):
        if not isinstance(item, dict) or "from" not in item or "value" not in item:
            raise BadSample("malformed", "each conversation turn needs 'from' and 'value'")
        turns.append((item["from"], item["value"]))
    return turns, [], []


def _turns_from_messages(messages):
    """The OpenAI/HF form: content is a string or a list of {"type": text|image|video} parts."""
    turns, images, videos = [], [], []
    for item in _list_of_turns(messages, "messages"):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise BadSample("malformed", "each message needs 'role' and 'content'")
        content = item["content"]
        if isinstance(content, str):
            turns.append((item["role"], content))
            continue
        if not isinstance(content, list):
            raise BadSample("malformed", "message content must be a string or a list of parts")
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise BadSample("malformed", f"text part must hold a string, got {type(text).__name__}")
                pieces.append(text)
            elif kind in ("image", "video"):
                target = images if kind == "image" else videos
                path = part.get(kind) or part.get("path")
                if not isinstance(path, str):
                    raise BadSample("malformed", f"{kind} part without a path")
                target.append(path)
                pieces.append(IMAGE_PLACEHOLDER if kind == "image" else VIDEO_PLACEHOLDER)
            else:
                raise BadSample("malformed", f"unknown content part {part!r:.80}")
        turns.append((item["role"], "\n".join(pieces)))
    return turns, images, videos


def _validated_turns(raw_turns):
    turns = []
    for number, (role, text) in enumerate(raw_turns):
        if not isinstance(role, str) or role not in _ROLES:
            raise BadSample("malformed", f"turn {number}: unknown role {role!r:.80}")
        if not isinstance(text, str):
            raise BadSample("malformed", f"turn {number}: text must be a string, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:  # a lone surrogate ("\ud800" in the JSON) has no UTF-8 form
                raise BadSample("malformed", f"turn {number}: text is not valid Unicode ({error.reason} at "
                                             f"character {error.start})") from None
        turns.append(Turn(_ROLES[role], text))
    if not any(t.role == "assistant" for t in turns):
        raise BadSample("malformed", "no assistant turn to supervise")
    return turns


def _place_media(turns, placeholder, count, kind):
    """LLaVA convention: media without placeholders go in front of the first user turn."""
    found = sum(t.text.count(placeholder) for t in turns)
    if found == 0 and count:
        first_user = next((t for t in turns if t.role == "user"), None)
        if first_user is None:
            raise BadSample("malformed", f"{kind} given but no user turn to attach it to")
        first_user.text = "\n".join([placeholder] * count + [first_user.text])
    elif found != count:
        raise BadSample("malformed", f"{found} {placeholder} placeholders for {count} {kind}(s)")


def parse_record(obj, root, fallback_id, check_exists=True):
    """Validate one decoded JSON object into a `Record`; raises `BadSample` on any problem, and only that."""
    if not isinstance(obj, dict):
        raise BadSample("malformed", f"record must be a JSON object, got {type(obj).__name__}")
    record_id = obj.get("id", fallback_id)
    record_id = record_id if isinstance(record_id, str) else json.dumps(record_id)[:200]
    try:
        return _parse_fields(obj, root, record_id, check_exists)
    except BadSample as bad:
        bad.record_id = record_id
        raise
    except Exception as error:  # noqa: BLE001 -- a shape no check above foresaw is still one bad record
        bad = BadSample("malformed", f"{type(error).__name__}: {error}")
        bad.record_id = record_id
        raise bad from error


def _parse_fields(obj, root, record_id, check_exists):
    if "conversations" in obj:
        raw_turns, images, videos = _turns_from_conversations(obj["conversations"])
    elif "messages" in obj:
        raw_turns, images, videos = _turns_from_messages(obj["messages"])
    else:
        raise BadSample("malformed", "record has neither 'conversations' nor 'messages'")
    images = images + _media_list(obj.get("image", obj.get("images")), "image")
    videos = videos + _media_list(obj.get("video", obj.get("videos")), "video")
    turns = _validated_turns(raw_turns)
    _place_media(turns, IMAGE_PLACEHOLDER, len(images), "image")
    _place_media(turns, VIDEO_PLACEHOLDER, len(videos), "video")
    return Record(
        id=record_id,
        turns=turns,
        images=[resolve_media(p, root, check_exists) for p in images],
        videos=[resolve_media(p, root, check_exists) for p in videos],
    )


def parse_line(line, root, fallback_id, check_exists=True):
    """Decode and validate one JSONL line (UTF-8 only: JSON Lines files are UTF-8)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample("malformed", f"line is not UTF-8: byte 0x{line[err.start]:02x} at column "
                                         f"{err.start + 1}") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadSample("malformed", f"invalid JSON: {err}") from None
    except RecursionError:
        raise BadSample("malformed", "invalid JSON: nested too deeply") from None
    return parse_record(obj, root, fallback_id, check_exists)


def parse_raw(raw, root, fallback_id, check_exists=True):
    """A JSONL line (bytes) or an already decoded object from a JSON-list file."""
    if isinstance(raw, (bytes, str)):
        return parse_line(raw, root, fallback_id, check_exists)
    return parse_record(raw, root, fallback_id, check_exists)


def scan_annotation(path):
    """(line number, byte offset) of every non-empty line of a JSONL file, or None for a JSON-list file.

    Offsets let a worker read one record with a seek instead of holding the whole file in memory; line
    numbers (from 1) name a bad record's place for people.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    if path.endswith(".json"):
        return None
    lines = []
    with open(path, "rb") as handle:
        position = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                lines.append((number, position))
            position += len(line)
    return lines


def _line_and_column(data, position):
    line = data.count(b"\n", 0, position) + 1
    return line, position - (data.rfind(b"\n", 0, position) + 1) + 1


def load_json_list(path):
    """The records of a `.json` annotation file, which must be one UTF-8 JSON list; a single bad entry in
    it is left to `parse_record`, a file that cannot be read as a list raises AnnotationFileError."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line, column = _line_and_column(data, err.start)
        raise AnnotationFileError(f"{path}: not UTF-8 at line {line} column {column} (byte {err.start}): "
                                  f"a .json annotation file must be UTF-8 JSON") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        ending = " (the file ends early: truncated?)" if err.pos >= len(text) - 1 else ""
        raise AnnotationFileError(f"{path}: invalid JSON at line {err.lineno} column {err.colno} "
                                  f"(char {err.pos}): {err.msg}{ending}") from None
    except RecursionError:
        raise AnnotationFileError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(records, list):
        raise AnnotationFileError(f"{path}: a .json annotation file must hold a list of records, "
                                  f"got a JSON {type(records).__name__} at line 1")
    return records


def read_jsonl_line(path, offset):
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.readline()
