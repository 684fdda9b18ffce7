"""Put our kernels into Hugging Face models: `apply_kernels(model)` for a built model, `patch_model_class(cls)`
for a model type before it is built.

Module instances are patched, not the transformers modules: every RMSNorm, SwiGLU MLP, attention block and
causal LM found in the model gets its class swapped for a subclass whose `forward` calls our kernels (the
causal LM's computes the training loss with the fused linear + cross-entropy). No parameter or buffer is
added, renamed or moved, so state-dict keys, `save_pretrained` / `from_pretrained`, PEFT wrappers and
optimizers see the same model; other instances of the same class stay untouched.

Supported (see `SUPPORTED`): Qwen2 / Qwen2.5, Llama, Qwen3 (its per-head q/k norms too), SigLIP and any model
built from them, such as our Eagle (SigLIP vision tower + Qwen2 language model). SigLIP normalises with
LayerNorm and its MLP is fc1 -> GELU(tanh) -> fc2, and it has no rotary embedding: none of our kernels fits it,
so it is accepted and left as it is.
"""
import dataclasses
import functools
import importlib
import logging
import sys

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple

from longvl.kernels.linear_cross_entropy import linear_cross_entropy as fused_linear_cross_entropy
from longvl.kernels.rms_norm import rms_norm as fused_rms_norm
from longvl.kernels.rope import apply_rope
from longvl.kernels.swiglu import swiglu as fused_swiglu
from longvl.kernels.swiglu import swiglu_mlp

logger = logging.getLogger(__name__)

# transformers 5.2x renamed the KV cache `past_key_values` -> `cache` (arguments and output fields); both occur.
CACHE_NAMES = ("cache", "past_key_values")
OUTPUT_CACHE_FIELD = next(f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name in CACHE_NAMES)


def _pop_cache(kwargs):
    """The KV cache passed under either of its names (None when there is none), removed from kwargs."""
    found = [kwargs.pop(name, None) for name in CACHE_NAMES]
    return next((cache for cache in found if cache is not None), None)

# Model family shown to users -> (transformers module, class-name prefix, whether any kernel fits it).
SUPPORTED = {
    "Qwen2 / Qwen2.5": ("transformers.models.qwen2.modeling_qwen2", "Qwen2", True),
    "Llama": ("transformers.models.llama.modeling_llama", "Llama", True),
    "Qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3", True),
    "SigLIP (LayerNorm + GELU MLP, no RoPE: no kernel applies)": (
        "transformers.models.siglip.modeling_siglip", "Siglip", False),
}
_SUPPORTED_TEXT = "; ".join(SUPPORTED) + "; models composed of them, e.g. Eagle (SigLIP + Qwen2)"
_SILU_NAMES = ("silu", "swish")
LOSS_CHUNKINGS = ("tokens", "vocab")          # the fused loss's work split (longvl.kernels.linear_cross_entropy)
LM_HEAD_GRAD_DTYPES = ("float32", "weight")   # the dtype the lm-head gradient is summed in across token chunks


class _FusedRMSNorm:
    """RMSNorm through our kernel; HF's 'llama' casting: normalise in fp32, cast, then scale by the weight."""

    def forward(self, hidden_states):
        return fused_rms_norm(hidden_states, self.weight, self.variance_epsilon, casting="llama")


class _FusedSwiGLUMLP:
    """down(silu(gate(x)) * up(x)) through our fused MLP: backward keeps the two pre-activations, where eager
    autograd keeps four intermediate-sized tensors."""

    def forward(self, x):
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if all(type(p) is nn.Linear for p in projections):
            return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                              self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias)
        # LoRA or quantised layers wrap the projections: keep their forward and fuse only the activation.
        return self.down_proj(fused_swiglu(self.gate_proj(x), self.up_proj(x)))


class _FusedRopeAttention:
    """The HF attention block of Qwen2, Llama and Qwen3 with our RoPE kernel.

    HF rotates q and k through a module-level function; replacing it would change every instance in the
    process, so this forward re-states the block (projections, optional per-head q/k norms, rotation, cache
    update, the configured attention interface, output projection) for this instance only. Rotating in the
    projections' (batch, seq, heads, dim) layout avoids a transposed copy.
    """

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        heads_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(heads_shape)
        key = self.k_proj(hidden_states).view(heads_shape)
        value = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)
        if hasattr(self, "q_norm"):  # Qwen3 normalises each head before rotating it
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        query, key = apply_rope(query, key, cos, sin, layout="bshd")
        query, key = query.transpose(1, 2), key.transpose(1, 2)
        cache = _pop_cache(kwargs)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                          self._eager_attention)
        if hasattr(self, "sliding_window"):  # Qwen2 / Qwen3 pass their window; Llama has none
            kwargs["sliding_window"] = self.sliding_window
        output, weights = attention(self, query, key, value, attention_mask,
                                    dropout=self.attention_dropout if self.training else 0.0,
                                    scaling=self.scaling, **kwargs)
        output = output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(output), weights


class _PreciseRotaryEmbedding:
    """HF's rotary embedding with its angles computed in float64, then cos / sin rounded once.

    HF forms `position x inv_freq` in fp32: at position 10^6 the product (and the fp32 inverse frequency
    itself) carries an error of up to ~0.06 rad, which makes distant tokens rotate to the wrong place. In fp64
    the angle error stays below 1e-9 rad up to 2^31 positions. Only the default RoPE type is patched (scaled
    variants keep HF's forward).
    """

    def forward(self, x, position_ids):
        if getattr(self, "rope_type", "default") != "default":
            return super().forward(x, position_ids)
        inv_freq = getattr(self, "_inv_freq_fp64", None)
        if inv_freq is None or inv_freq.device != x.device:
            dim = 2 * self.inv_freq.numel()
            params = getattr(self.config, "rope_parameters", None) or {}
            theta = params.get("rope_theta", getattr(self.config, "rope_theta", None))
            inv_freq = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim))
            self._inv_freq_fp64 = inv_freq
        angles = position_ids[..., None].double() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class _FusedCausalLM:
    """Causal LM whose training loss never materialises the (tokens x vocab) logits.

    Its class keeps the HF class's name, because save_pretrained writes that name into config.json's
    `architectures`, which other tools read back.
    """

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, logits_to_keep=0, return_logits=False, **kwargs):
        """In training with labels the loss is our fused linear + cross-entropy on the last hidden states, with
        HF's semantics: labels shifted left by one (or `shift_labels` as given), `ignore_index` skipped, the
        sum divided by `num_items_in_batch` when the trainer passes it (gradient accumulation), else the mean
        over counted tokens. Logits are returned only when `return_logits=True`. Eval, generation and calls
        without labels take HF's own forward unchanged, and so does an lm_head that is not a plain nn.Linear
        (LoRA-wrapped, or its own FSDP unit whose weight is only gathered inside its own forward).
        """
        if not (self.training and labels is not None and type(self.lm_head) is nn.Linear):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                   logits_to_keep=logits_to_keep, **kwargs)
        ignore_index = kwargs.pop("ignore_index", -100)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = getattr(self, self.base_model_prefix)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = outputs.last_hidden_state
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        loss = causal_lm_loss(self, hidden_states, shift_labels, ignore_index=ignore_index,
                              num_items_in_batch=num_items_in_batch)
        logits = None
        if return_logits:
            kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, kept, :])
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions,
                                      **{OUTPUT_CACHE_FIELD: getattr(outputs, OUTPUT_CACHE_FIELD)})


def causal_lm_loss(causal_lm, hidden_states, shift_labels, *, weights=None, reduction="mean", ignore_index=-100,
                   num_items_in_batch=None):
    """Cross-entropy of `causal_lm.lm_head(hidden_states)` against already shifted labels: the one training loss
    of the HF patch and of our trainer.

    Fused (no logits) when `causal_lm` carries our kernel (`apply_kernels(..., linear_cross_entropy=True)`)
    and its lm_head is a plain nn.Linear, with the lm-head gradient settings given to `apply_kernels`;
    otherwise fp32 logits and torch's cross-entropy. Reductions over tokens that are not `ignore_index`:
    "mean", or the sum divided by `num_items_in_batch` when given (gradient-accumulation micro-batches then
    add up to the mean over the whole batch); "sum". `weights` (per token) multiply each token's loss, with
    reduction "sum". Returns an fp32 0-dim tensor.
    """
    if shift_labels.shape != hidden_states.shape[:-1]:
        raise ValueError(f"shift_labels has shape {tuple(shift_labels.shape)}, expected "
                         f"{tuple(hidden_states.shape[:-1])} (the hidden states' batch and sequence)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"causal_lm_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    if weights is not None and reduction != "sum":
        raise ValueError("causal_lm_loss: per-token weights need reduction='sum'")
    lm_head = causal_lm.lm_head
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    target = shift_labels.reshape(-1).to(x.device)
    token_weights = None if weights is None else weights.reshape(-1).float()
    if num_items_in_batch is not None:
        reduction = "sum"
    if isinstance(causal_lm, _FusedCausalLM) and type(lm_head) is nn.Linear:
        loss = fused_linear_cross_entropy(x, lm_head.weight, target, lm_head.bias, ignore_index=ignore_index,
                                          reduction=reduction, weights=token_weights,
                                          **causal_lm.lce_options).float()
    else:
        losses = nn.functional.cross_entropy(lm_head(x).float(), target, reduction="none", ignore_index=ignore_index)
        if token_weights is not None:
            losses = losses * token_weights
        loss = losses.sum() if reduction == "sum" else losses.sum() / (target != ignore_index).sum().clamp_min(1)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


@functools.cache
def _targets():
    """{HF class: (kind, fused mixin)} for every class a kernel replaces, over the supported families."""
    targets = {}
    for module_name, prefix, has_kernels in SUPPORTED.values():
        if not has_kernels:
            continue
        module = importlib.import_module(module_name)
        targets[getattr(module, f"{prefix}RMSNorm")] = ("rms_norm", _FusedRMSNorm)
        targets[getattr(module, f"{prefix}MLP")] = ("swiglu", _FusedSwiGLUMLP)
        targets[getattr(module, f"{prefix}Attention")] = ("rope", _FusedRopeAttention)
        targets[getattr(module, f"{prefix}RotaryEmbedding")] = ("rope", _PreciseRotaryEmbedding)
        targets[getattr(module, f"{prefix}ForCausalLM")] = ("linear_cross_entropy", _FusedCausalLM)
    return targets


@functools.cache
def _fused_class(module_class, hf_class, mixin):
    """A subclass of `module_class` (HF's class or a user's subclass of it) with the mixin's forward: same
    parameters, so same state-dict keys, and no instance attribute that would tie the module to itself."""
    namespace = {"__module__": __name__}
    if mixin is _FusedRopeAttention:  # the eager fallback lives next to the HF class
        namespace["_eager_attention"] = staticmethod(sys.modules[hf_class.__module__].eager_attention_forward)
    name = module_class.__name__ if mixin is _FusedCausalLM else f"Fused{module_class.__name__}"
    return type(name, (mixin, module_class), namespace)


def _hf_class_of(module_class):
    """The supported HF class whose forward `module_class` runs unchanged, or None."""
    targets = _targets()
    for cls in module_class.__mro__:
        if cls in targets:
            return cls if module_class.forward is cls.forward else None
    return None


def _is_supported_class(module_class) -> bool:
    modules = {module_name for module_name, _, _ in SUPPORTED.values()}
    return any(cls.__module__ in modules for cls in module_class.__mro__)


def _patch_module(module, kind, hf_class, mixin) -> bool:
    """Swap one module to its fused form; False when it does not qualify (e.g. a non-SiLU MLP)."""
    if kind == "swiglu" and getattr(module.config, "hidden_act", None) not in _SILU_NAMES:
        return False
    module.__class__ = _fused_class(type(module), hf_class, mixin)
    return True


def _check_loss_settings(caller, loss_chunking, lm_head_grad_dtype):
    if loss_chunking not in LOSS_CHUNKINGS:
        raise ValueError(f"{caller}: loss_chunking must be one of {LOSS_CHUNKINGS}, got {loss_chunking!r}")
    if lm_head_grad_dtype not in LM_HEAD_GRAD_DTYPES:
        raise ValueError(f"{caller}: lm_head_grad_dtype must be one of {LM_HEAD_GRAD_DTYPES}, got "
                         f"{lm_head_grad_dtype!r}")
    if loss_chunking == "vocab" and lm_head_grad_dtype != "float32":
        raise ValueError(f"{caller}: loss_chunking='vocab' forms the lm-head gradient in float32 inside its GEMMs; "
                         f"lm_head_grad_dtype must be 'float32'")


def apply_kernels(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
                  linear_cross_entropy: bool = True, loss_chunking: str = "tokens",
                  lm_head_grad_dtype: str = "float32") -> nn.Module:
    """Patch every supported module inside `model` (built, loaded, PEFT-wrapped or composite) in place.

    The fused loss's settings (longvl.kernels.linear_cross_entropy): `loss_chunking` "tokens" (fastest) or
    "vocab" (least memory); `lm_head_grad_dtype` "float32" (the lm-head gradient summed over token chunks in
    fp32 and rounded once: exact, the default) or "weight" (summed in the weight's dtype, as Liger-Kernel
    does: 1.6 GiB less at Qwen2.5-7B's head, a few % slower). Returns `model`. Raises TypeError when `model`
    is not a module and ValueError when it contains no supported model type or a setting is unknown.
    Patching again is harmless and updates the loss settings.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_kernels expects a torch.nn.Module, got {type(model).__name__}")
    _check_loss_settings("apply_kernels", loss_chunking, lm_head_grad_dtype)
    if not any(isinstance(m, PreTrainedModel) and _is_supported_class(type(m)) for m in model.modules()):
        raise ValueError(f"apply_kernels: {type(model).__name__} contains no supported model type. "
                         f"Supported: {_SUPPORTED_TEXT}.")
    wanted = {"rms_norm": rms_norm, "rope": rope, "swiglu": swiglu,
              "linear_cross_entropy": linear_cross_entropy}
    patched = dict.fromkeys(wanted, 0)
    for module in model.modules():
        hf_class = _hf_class_of(type(module))
        if hf_class is None:
            continue
        kind, mixin = _targets()[hf_class]
        # A forward set on the instance (another library's patch, accelerate's hooks) would shadow ours: skip.
        if wanted[kind] and "forward" not in vars(module) and _patch_module(module, kind, hf_class, mixin):
            patched[kind] += 1
    for module in model.modules():
        if isinstance(module, _FusedCausalLM):  # a plain attribute: no parameter, buffer or config entry
            module.lce_options = {"chunking": loss_chunking, "dw_dtype": lm_head_grad_dtype}
    logger.info("apply_kernels(%s): patched %s", type(model).__name__, patched)
    return model


def patch_model_class(model_class: type, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
                      linear_cross_entropy: bool = True, loss_chunking: str = "tokens",
                      lm_head_grad_dtype: str = "float32") -> type:
    """Make every instance of `model_class` built from now on (constructor, from_pretrained, from_config)
    carry the kernels, by running `apply_kernels` at the end of its `__init__`. Returns `model_class`.

    Classes from transformers are checked now; composite classes of one's own (Eagle) when first built.
    """
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        raise TypeError(f"patch_model_class expects a torch.nn.Module subclass, got {model_class!r}")
    if model_class.__module__.startswith("transformers.") and not _is_supported_class(model_class):
        raise ValueError(f"patch_model_class: {model_class.__name__} is not a supported model type. "
                         f"Supported: {_SUPPORTED_TEXT}.")
    _check_loss_settings("patch_model_class", loss_chunking, lm_head_grad_dtype)
    flags = {"rms_norm": rms_norm, "rope": rope, "swiglu": swiglu, "linear_cross_entropy": linear_cross_entropy,
             "loss_chunking": loss_chunking, "lm_head_grad_dtype": lm_head_grad_dtype}
    unpatched_init = getattr(model_class.__init__, "_unpatched_init", model_class.__init__)

    @functools.wraps(unpatched_init)
    def init_with_kernels(self, *args, **kwargs):
        unpatched_init(self, *args, **kwargs)
        apply_kernels(self, **flags)

    init_with_kernels._unpatched_init = unpatched_init
    model_class.__init__ = init_with_kernels
    return model_class
