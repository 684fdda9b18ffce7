"""Eagle 2.5 configuration with the keys of the released checkpoint's config.json.

A released config.json loads as is: unknown release-only keys (e.g. `loss_version`) are kept as attributes and
ignored. `eagle2_5_8b_config()` gives the 8B shapes without downloading anything; `tiny_eagle_config()` gives a
few-kilobyte model with the same structure for tests and the demo.
"""
from transformers import AutoConfig, PreTrainedConfig, SiglipVisionConfig


class EagleConfig(PreTrainedConfig):
    """Vision tower (SigLIP), pixel-shuffle connector `mlp1` and a causal LM backbone (`text_config`)."""

    model_type = "eagle_2_5_vl"
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str = "qwen2-chat"
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_tiles: int = 1
    max_dynamic_tiles: int = 12
    image_token_index: int = 151667
    use_pixel_shuffle: bool = True
    mlp_connector_layers: int = 2
    vision_micro_batch: int | None = None  # ours: tiles per vision-tower call; None = all at once

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            vision = dict(self.vision_config)
            vision.pop("model_type", None)
            vision.setdefault("vision_use_head", False)  # the pooling head is unused: do not build it
            self.vision_config = SiglipVisionConfig(**vision)
        elif self.vision_config is None:
            self.vision_config = SiglipVisionConfig(vision_use_head=False)
        if isinstance(self.text_config, dict):
            text = dict(self.text_config)
            self.text_config = AutoConfig.for_model(text.pop("model_type", "qwen2"), **text)
        elif self.text_config is None:
            self.text_config = AutoConfig.for_model("qwen2")
        if self.force_image_size is None:
            self.force_image_size = self.vision_config.image_size
        super().__post_init__(**kwargs)
        self._check_shapes()

    def _check_shapes(self):
        image, patch = self.vision_config.image_size, self.vision_config.patch_size
        if self.force_image_size != image:
            raise ValueError(f"force_image_size={self.force_image_size} differs from the vision tower's "
                             f"image_size={image}; SigLIP position embeddings are built for one size")
        if image % patch:
            raise ValueError(f"image_size {image} is not a multiple of patch_size {patch}")
        if self.use_pixel_shuffle and (image // patch) % self.shuffle_factor:
            raise ValueError(f"pixel shuffle by {self.shuffle_factor} needs a patch grid divisible by it, "
                             f"got {image // patch}x{image // patch}")
        if self.mlp_connector_layers != 2:
            raise ValueError(f"mlp_connector_layers={self.mlp_connector_layers}: only the released 2-layer "
                             "connector (LayerNorm, Linear, GELU, Linear) is supported")
        if not 1 <= self.min_dynamic_tiles <= self.max_dynamic_tiles:
            raise ValueError(f"need 1 <= min_dynamic_tiles <= max_dynamic_tiles, got "
                             f"{self.min_dynamic_tiles}, {self.max_dynamic_tiles}")

    @property
    def shuffle_factor(self) -> int:
        """Side of the cell block merged into one token (2 for downsample_ratio 0.5), 1 without pixel shuffle."""
        if not self.use_pixel_shuffle:
            return 1
        factor = round(1 / self.downsample_ratio)
        if abs(factor * self.downsample_ratio - 1) > 1e-6:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} is not 1/k for an integer k")
        return factor

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one tile becomes: (patch grid / shuffle factor)^2, 256 for the released 448/14 model."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return (grid // self.shuffle_factor) ** 2


def eagle2_5_8b_config(**overrides) -> EagleConfig:
    """Shapes of the released Eagle 2.5 8B: SigLIP so400m 448/14 + Qwen2.5-7B."""
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  image_size=448, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                  vision_use_head=False)
    text = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0,
                tie_word_embeddings=False, hidden_act="silu")
    return EagleConfig(vision_config=vision, text_config=text, **overrides)


def tiny_eagle_config(vocab_size: int, image_token_index: int, **overrides) -> EagleConfig:
    """A structurally identical few-kilobyte model: 56/14 tiles (4x4 grid -> 4 tokens per tile), 2+2 layers."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=56, patch_size=14, vision_use_head=False)
    text = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab_size,
                max_position_embeddings=4096, tie_word_embeddings=False)
    return EagleConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                       **overrides)
