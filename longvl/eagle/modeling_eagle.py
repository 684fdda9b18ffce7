"""Eagle 2.5: SigLIP vision tower -> pixel shuffle -> `mlp1` -> spliced into a causal LM at `<IMG_CONTEXT>`.

Module names follow the released checkpoint so its safetensors shards load with no key mapping:
`vision_model.vision_model.*` (SigLIP), `mlp1.{0,1,3}.*` (LayerNorm, Linear, GELU, Linear) and
`language_model.{model,lm_head}.*` (a plain Hugging Face causal LM, so kernel patches and context-parallel
attention apply to it unchanged).

Two forwards share one image-feature splice (`place_image_features`): the Hugging Face `forward` (generation,
evaluation, HF training) and `packed_loss`, the trainer's forward over one context-parallel shard of a packed
sequence. `extract_features(pixel_values)` runs any subset of tiles and `forward(..., image_features=...)`
splices features computed elsewhere, in `<IMG_CONTEXT>` order.

For inference: `model.generate(**processor(...))` takes the processor's output as is; the vision tower runs once,
at prefill, and beams or several returned sequences keep each prompt's tiles (`import longvl.eagle` registers
the class with transformers' Auto classes).
"""
from __future__ import annotations

import typing

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel, SiglipVisionModel

from longvl.eagle.configuration_eagle import EagleConfig
from longvl.eagle.pixel_shuffle import pixel_shuffle

if typing.TYPE_CHECKING:
    from longvl.eagle.data.batch import PackedBatch
    from longvl.parallel.hf import CPSequence


# Inputs used at prefill only; also repeated per prompt (not per row) for beams.
_VISION_INPUTS = ("pixel_values", "image_features", "image_flags", "num_tiles")


def _as_model_pixels(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if pixels.dtype == torch.uint8:
        return pixels.to(dtype).mul_(1 / 127.5).sub_(1.0)
    return pixels.to(dtype)


class EagleVisionTower(nn.Module):
    """Holds the SigLIP model one level down, so parameter names read `vision_model.vision_model.*` as released."""

    def __init__(self, config):
        super().__init__()
        self.vision_model = SiglipVisionModel(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int) -> torch.Tensor:
        """(tiles, 3, s, s) -> (tiles, cells, C): the post-layernorm output for -1, else that hidden state."""
        if select_layer == -1:
            return self.vision_model(pixel_values=pixel_values).last_hidden_state
        hidden = self.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return hidden[select_layer]


class EagleForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """The whole model: save_pretrained / from_pretrained in the released layout, forward with labels, generate."""

    config_class = EagleConfig
    config: EagleConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Checkpoints that ship SigLIP's unused pooling head load fine without it.
    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.vision_model\.head\."]

    def __init__(self, config: EagleConfig):
        super().__init__(config)
        self.vision_model = EagleVisionTower(config.vision_config)
        merged = config.vision_config.hidden_size * config.shuffle_factor ** 2
        hidden = config.text_config.hidden_size
        self.mlp1 = nn.Sequential(nn.LayerNorm(merged), nn.Linear(merged, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # --- embeddings: the language model's --------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value):
        self.language_model.set_output_embeddings(value)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained, with the weight files given the umask's mode (safetensors makes them
        0600 while every other file of the folder gets the default)."""
        from longvl.eagle.export import give_default_modes, weight_files

        result = super().save_pretrained(save_directory, *args, **kwargs)
        give_default_modes(weight_files(save_directory))
        return result

    def apply_kernels(self, **which):
        """Swap in our Triton RMSNorm / RoPE / SwiGLU / linear+CE (longvl.kernels.apply_kernels); returns self."""
        from longvl import kernels

        return kernels.apply_kernels(self, **which)

    # --- vision ----------------------------------------------------------------------------------------------
    def extract_features(self, pixel_values: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor:
        """(tiles, 3, s, s) -> (tiles, tokens_per_tile, hidden), `micro_batch` tiles at a time to bound memory.

        Pixels are normalised floats, or raw uint8 from `EagleImageProcessor(pixel_dtype="uint8")`, normalised
        here (mean 0.5, std 0.5) one micro-batch at a time."""
        size = self.config.force_image_size
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values must be (tiles, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        dtype = self.mlp1[1].weight.dtype
        if pixel_values.shape[0] == 0:  # text-only sample
            return pixel_values.new_zeros(0, self.config.tokens_per_tile, self.config.text_config.hidden_size,
                                          dtype=dtype)
        micro_batch = micro_batch or self.config.vision_micro_batch or pixel_values.shape[0]
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        chunks = [self._features(_as_model_pixels(chunk, dtype)) for chunk in pixel_values.split(micro_batch)]
        return torch.cat(chunks)

    def _features(self, pixel_values):
        cells = self.vision_model(pixel_values, self.config.select_layer)
        if self.config.use_pixel_shuffle:
            cells = pixel_shuffle(cells, self.config.shuffle_factor)
        return self.mlp1(cells)

    @staticmethod
    def place_image_features(inputs_embeds, image_features, feature_index):
        """Token t's embedding becomes feature row `feature_index[t]` (-1: the token keeps its embedding)."""
        rows = image_features.reshape(-1, inputs_embeds.shape[-1])
        mask = feature_index >= 0
        picked = rows.index_select(0, feature_index[mask])
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), picked.to(inputs_embeds.dtype))

    def splice_image_features(self, input_ids, inputs_embeds, image_features):
        """Write the features over the `<IMG_CONTEXT>` embeddings, in order; the counts must match exactly."""
        mask = input_ids == self.config.image_token_index
        rows = image_features.reshape(-1, inputs_embeds.shape[-1]).shape[0]
        slots = int(mask.sum())
        if slots != rows:
            raise ValueError(f"{slots} <IMG_CONTEXT> tokens (id {self.config.image_token_index}) in input_ids but "
                             f"{rows} image feature vectors ({self.config.tokens_per_tile} per tile): "
                             "the processor's placeholders and the pixel tiles disagree")
        feature_index = torch.where(mask, mask.reshape(-1).long().cumsum(0).view(mask.shape) - 1, -1)
        return self.place_image_features(inputs_embeds, image_features, feature_index)

    # --- the trainer's forward: one context-parallel shard of a packed sequence ------------------------------
    def _tile_share(self, pixel_values, rank: int, size: int):
        """This rank's contiguous share of the tiles, padded with blank tiles to the largest share (>= 1), and
        every rank's real count: every rank runs the tower the same number of times (FSDP needs that)."""
        base, extra = divmod(pixel_values.shape[0], size)
        counts = [base + (r < extra) for r in range(size)]
        start = sum(counts[:rank])
        mine = pixel_values[start:start + counts[rank]]
        width = max(1, max(counts))
        if mine.shape[0] < width:
            side = self.config.force_image_size
            mine = torch.cat([mine, mine.new_zeros(width - mine.shape[0], 3, side, side)])
        return mine, counts

    def packed_loss(self, batch: PackedBatch, context_parallel: CPSequence | None = None) -> torch.Tensor:
        """Sum of the weighted token losses of one (context-parallel shard of a) packed sequence.

        Vision under context parallelism: the pack's tiles are split evenly over the CP ranks, each runs the
        tower on its own share, the features are all-gathered with autograd and each rank places the rows its
        tokens need. The all-gather's backward sums every rank's feature gradients onto the tile's owner, so
        the tower learns from tokens on all ranks. The local and gathered features also join the loss with
        weight 0, so every rank runs the same ops whatever its tokens (text-only packs still run the tower's
        backward, and the exchange's backward collective comes at the same point on every rank). Summed over
        the CP group, the result is the pack's loss (the weights hold the global per-document counts).
        """
        from longvl.kernels.hf_patch import causal_lm_loss
        from longvl.parallel.hf import KWARG

        group = None if context_parallel is None else context_parallel.groups.cp
        rank, size = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
        lm = self.language_model
        embeds = lm.get_input_embeddings()(batch.input_ids)
        tiles, counts = self._tile_share(batch.pixel_values, rank, size)
        local = self.extract_features(tiles)
        if size == 1:
            features = local[: counts[0]]
        else:
            from torch.distributed.nn.functional import all_gather

            parts = all_gather(local.contiguous(), group=group)
            features = torch.cat([part[:n] for part, n in zip(parts, counts)])
        embeds = self.place_image_features(embeds, features, batch.feature_index)
        embeds = embeds + 0 * (features.sum() + local.sum()).to(embeds.dtype)
        attention = {} if context_parallel is None else {KWARG: context_parallel}
        hidden = lm.model(inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False,
                          **attention).last_hidden_state
        return causal_lm_loss(lm, hidden, batch.target_ids, weights=batch.loss_weights, reduction="sum")

    # --- forward / generate ----------------------------------------------------------------------------------
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, labels=None, image_flags=None, image_features=None, num_tiles=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        """Splice vision features into the text embeddings, then run the language model.

        Tiles go to the `<IMG_CONTEXT>` positions in order (row-major over the batch), `tokens_per_tile` each.
        `num_tiles` (tiles per `<img>` block, as the processor returns it) is checked against the tiles given.
        `image_flags` (one per tile, 0 for padding tiles of text-only samples) keeps flagged-off tiles out of
        the sequence while their features still join the graph with weight 0, so every rank's vision tower
        gets a gradient (FSDP needs it). `image_features` replaces `pixel_values` when computed elsewhere. The
        KV cache travels in kwargs under whichever name the installed transformers uses.
        """
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image_features = self.extract_features(pixel_values)
        if image_features is not None:
            if input_ids is None:
                raise ValueError("splicing image features needs input_ids to find the <IMG_CONTEXT> positions")
            if num_tiles is not None and int(num_tiles.sum()) != image_features.shape[0]:
                raise ValueError(f"num_tiles adds up to {int(num_tiles.sum())} tiles but {image_features.shape[0]} "
                                 "were given")
            if image_flags is not None:
                keep = image_flags.reshape(-1).bool()
                if keep.numel() != image_features.shape[0]:
                    raise ValueError(f"image_flags has {keep.numel()} entries for {image_features.shape[0]} tiles")
                inputs_embeds = inputs_embeds + 0 * image_features[~keep].sum().to(inputs_embeds.dtype)
                image_features = image_features[keep]
            inputs_embeds = self.splice_image_features(input_ids, inputs_embeds, image_features)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)

    def prepare_inputs_for_generation(self, *args, is_first_iteration=False, **kwargs):
        """Vision inputs belong to the prompt only: decoding steps carry no `<IMG_CONTEXT>` tokens, so the
        vision tower runs once, at prefill."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in _VISION_INPUTS:
                inputs.pop(key, None)
        return inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None,
                                      **model_kwargs):
        """Beam search and num_return_sequences repeat each prompt; its tiles must repeat with it (they are
        indexed by tile, not by prompt, so the generic row-wise repeat would pair prompts with wrong tiles)."""
        vision = {key: model_kwargs.pop(key) for key in _VISION_INPUTS if model_kwargs.get(key) is not None}
        if vision and expand_size > 1:
            vision = self._repeat_tiles_per_prompt(input_ids, vision, expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        return input_ids, {**model_kwargs, **vision}

    def _repeat_tiles_per_prompt(self, input_ids, vision: dict, times: int) -> dict:
        if input_ids is None or "image_flags" in vision:
            raise ValueError("repeating prompts in generate (beams, num_return_sequences) needs input_ids, and "
                             "works without image_flags")
        slots = (input_ids == self.config.image_token_index).sum(1)
        if bool((slots % self.config.tokens_per_tile).any()):
            raise ValueError(f"a prompt's <IMG_CONTEXT> count {slots.tolist()} is not a multiple of "
                             f"{self.config.tokens_per_tile} tokens per tile")
        tiles = (slots // self.config.tokens_per_tile).tolist()
        for key in ("pixel_values", "image_features"):
            if key in vision and vision[key].shape[0] != sum(tiles):
                raise ValueError(f"{key} holds {vision[key].shape[0]} tiles but the prompts' <IMG_CONTEXT> "
                                 f"tokens ask for {sum(tiles)}")
        out = {}
        for key in ("pixel_values", "image_features"):
            if key in vision:
                out[key] = torch.cat([part.repeat(times, *[1] * (part.dim() - 1))
                                      for part in vision[key].split(tiles)])
        if "num_tiles" in vision:
            blocks, start = [], 0
            counts = vision["num_tiles"].tolist()
            for prompt_tiles in tiles:  # the blocks of each prompt: consecutive, adding up to its tiles
                end, total = start, 0
                while total < prompt_tiles:
                    total += counts[end]
                    end += 1
                if total != prompt_tiles:
                    raise ValueError(f"num_tiles {counts} does not split into the prompts' tiles {tiles}")
                blocks += [vision["num_tiles"][start:end]] * times
                start = end
            out["num_tiles"] = torch.cat(blocks)
        return out
