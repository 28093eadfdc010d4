"""Per-family adapters: where each Hugging Face architecture keeps its parts.

This is the only module that knows HF module paths. Everything else asks the adapter for
"the module whose output is added to the residual after attention", "the q projection",
and so on. Grouped-query attention: q, z, pattern and result are per query head
(`n_heads`); k and v are per key/value head (`n_kv_heads`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    """Shape facts of a wrapped model, in TransformerLens's vocabulary."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    d_mlp: int  # width of the MLP's hidden activation (`mlp.hook_post`)
    parallel_attn_mlp: bool = False
    has_pos_embed: bool = False
    sliding_window: Optional[int] = None
    layer_types: Optional[tuple[str, ...]] = None  # "full_attention" / "sliding_attention" per layer

    @property
    def n_groups(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class NormSpec:
    """What a norm module computes, so its map can be applied with the scale frozen.

    kind: "layernorm" (centre, divide by the standard deviation) or "rmsnorm" (divide by the
    root mean square); eps: added to the variance / mean square; plus_one: the weight acts as
    (1 + w) (Gemma's RMSNorm). A norm without a `weight` (OLMo's) multiplies by nothing.
    """

    kind: str
    eps: float
    plus_one: bool = False


@dataclass(frozen=True)
class QKV:
    """How a layer computes q, k and v.

    separate: three Linear modules (Llama family).
    fused_gpt2: one Conv1D giving [q | k | v] along the feature axis.
    fused_neox: one Linear giving [head, (q | k | v), d_head].
    """

    layout: str
    q: nn.Module
    k: Optional[nn.Module] = None
    v: Optional[nn.Module] = None


@dataclass(frozen=True)
class LayerParts:
    block: nn.Module
    attn: nn.Module  # the module that calls the attention function
    qkv: QKV
    o_proj: nn.Module  # input: z flattened over heads; output: the heads' summed contribution
    attn_out: nn.Module  # its output is what the block adds to the residual after attention
    mlp_out: nn.Module  # its output is what the block adds to the residual after the MLP
    mlp_down: nn.Module  # its input is the MLP's hidden activation (hook_post)
    ln1: nn.Module
    ln2: nn.Module


@dataclass(frozen=True)
class Adapter:
    """Where a wrapped model's parts are, and the operations that need to know how HF built them."""

    cfg: ModelConfig
    embed: nn.Module
    pos_embed: Optional[nn.Module]
    layers: tuple[LayerParts, ...]
    final_norm: nn.Module
    unembed: nn.Module
    final_norm_spec: NormSpec
    final_logit_softcapping: Optional[float] = None

    def W_O(self, layer: int) -> Float_HDM:
        """Output weights split per query head: [n_heads, d_head, d_model] (read from the offload map when offloaded)."""
        o = self.layers[layer].o_proj
        weight = real_param(o, "weight")
        w = weight if type(o).__name__ == "Conv1D" else weight.T  # Conv1D stores [in, out]
        return w.reshape(self.cfg.n_heads, self.cfg.d_head, self.cfg.d_model)

    def b_O(self, layer: int) -> Optional[Tensor]:
        """The output projection's bias, Float[Tensor, "d_model"], or None."""
        return real_param(self.layers[layer].o_proj, "bias")

    @property
    def input_device(self) -> torch.device:
        """Where token ids must go: the device the embedding runs on (its execution device when dispatched)."""
        return execution_device(self.embed)

    def apply_norm_frozen(self, stack: Tensor, resid: Tensor) -> Tensor:
        """The final norm's map at `resid`, with its scale frozen, applied to every component of `stack`.

        norm(resid) = resid * s(resid) * w (+ b): this returns each component times s(resid) * w
        (centred first for a LayerNorm; no bias), so the components still sum to the normed
        residual minus the bias. stack: Float[Tensor, "component ... d_model"]; resid:
        Float[Tensor, "... d_model"] (broadcast against each component). Computed in float32,
        returned in stack's dtype, same shape as stack.
        """
        spec = self.final_norm_spec
        weight = real_param(self.final_norm, "weight")
        x = resid.float()
        if spec.kind == "layernorm":
            centred = stack.float() - stack.float().mean(-1, keepdim=True)
            out = centred * torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + spec.eps)
        elif spec.kind == "rmsnorm":
            out = stack.float() * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.eps)
        else:
            raise ValueError(f"unknown norm kind {spec.kind!r}")
        if weight is not None:
            w = weight.float()
            out = out * (1.0 + w if spec.plus_one else w)
        return out.to(stack.dtype)

    def apply_unembed(self, normed: Tensor) -> Tensor:
        """Logits from a final-normed residual [..., d_model] -> [..., d_vocab], with the family's
        final logit soft-capping (Gemma 2: cap * tanh(logits / cap)) when its config sets one."""
        logits = self.unembed(normed)
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @contextlib.contextmanager
    def skip_blocks(self, layer: int, resid: Tensor) -> Iterator[None]:
        """While inside: blocks 0..layer-1 return `resid` without computing; block `layer` receives it.

        resid: Float[Tensor, "batch pos d_model"], the residual stream entering block `layer`
        (shaped as the forward's hidden states). The HF forward does everything else (embedding,
        masks, rotary embeddings, final norm, logits). Every supported family's decoder layer
        returns its hidden states as one tensor (transformers 5), so one replacement fits all.
        """
        if not 0 <= layer <= self.cfg.n_layers:
            raise ValueError(f"layer {layer} outside 0..{self.cfg.n_layers}")
        # A dispatched model (accelerate's device_map) already has an instance `forward` on each
        # block (accelerate's hook wrapper): it is put back on exit, not deleted.
        replaced: list[tuple[nn.Module, object]] = []
        try:
            for block in (self.layers[i].block for i in range(layer)):
                replaced.append((block, block.__dict__.get("forward")))
                block.forward = lambda hidden_states, *args, **kwargs: resid
            yield
        finally:
            for block, previous in replaced:
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous


Float_HDM = Tensor  # alias used in signatures: Float[Tensor, "head d_head d_model"]


# ---------------------------------------------------------------------------- accelerate's big-model dispatch
# `from_pretrained(device_map=...)` (interp.load(..., device_map=...)) attaches accelerate's
# AlignDevicesHook to the modules: each hook moves a module's inputs to its execution device,
# and, for offloaded modules (on "disk", or on "cpu" when the model runs on a GPU), loads the
# module's own weights from its `weights_map` before its forward and puts them back on the meta
# device after it. Outside its forward such a module's parameters are meta tensors: read them
# with `real_param`.


def _align_hooks(module: nn.Module) -> list:
    """accelerate's AlignDevicesHook(s) on this module (a SequentialHook may hold several), else []."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return [h for h in getattr(hook, "hooks", (hook,)) if hasattr(h, "execution_device")]


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate dispatched the model over devices or offloaded part of it (a `device_map` load)."""
    return bool(getattr(model, "hf_device_map", None)) and any(_align_hooks(m) for m in model.modules())


def execution_device(module: nn.Module) -> torch.device:
    """The device a module computes on: its accelerate execution device when dispatched, else its parameters' device."""
    for hook in _align_hooks(module):
        if hook.execution_device is not None:
            return torch.device(hook.execution_device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def real_param(module: nn.Module, name: str) -> Optional[Tensor]:
    """A module's own parameter or buffer `name` with its values, or None when it has none.

    An offloaded module's parameter sits on the meta device outside its forward; its values are
    then read from accelerate's offload map (disk or CPU RAM), in the parameter's dtype, on the
    module's execution device. Within the module's forward, or when not offloaded, the
    parameter itself is returned.
    """
    t = getattr(module, name, None)
    if t is None or t.device.type != "meta":
        return t
    return real_param_from_hook(module, name, t)


def real_param_from_hook(module: nn.Module, name: str, t: Tensor) -> Tensor:
    """The values of `module`'s meta tensor `t` (named `name`), read from its accelerate offload map."""
    for hook in _align_hooks(module):
        weights = getattr(hook, "weights_map", None)
        if not getattr(hook, "offload", False) or weights is None:
            continue
        try:
            value = weights[name]
        except KeyError:
            continue
        return value.to(device=hook.execution_device, dtype=t.dtype)
    raise RuntimeError(
        f"{type(module).__name__}.{name} is on the meta device and no accelerate offload hook on the module holds "
        "its values: it was never loaded. Load the model with interp.load(..., device_map=...) (accelerate attaches "
        "the hooks), or load it without meta-device initialisation."
    )


_READABLE: dict[type, type] = {}


def _readable_class(cls: type) -> type:
    """`cls` with `module.<param>` giving real values outside the forward (same name, a subclass of `cls`)."""
    if cls not in _READABLE:

        def __getattr__(self, name: str):
            value = cls.__getattr__(self, name)  # nn.Module's lookup: parameters, buffers, submodules
            if isinstance(value, Tensor) and value.device.type == "meta" and not _called_by_accelerate():
                return real_param_from_hook(self, name, value)
            return value

        _READABLE[cls] = type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__,
                                                      "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _READABLE[cls]


def _called_by_accelerate() -> bool:
    """Whether the attribute read comes from accelerate itself (its hooks move the meta parameters in and out)."""
    return sys._getframe(2).f_globals.get("__name__", "").startswith("accelerate.")


def make_offloaded_weights_readable(model: nn.Module) -> int:
    """Let code outside the forward read an offloaded module's weights (`module.weight`) as their real values.

    accelerate leaves an offloaded module's parameters on the meta device between forwards, and
    torch computes on a meta tensor mixed with a real one without an error: `x @ w_meta` returns
    uninitialised memory. Each offloaded module gets a subclass of its own class (same name) whose
    parameter reads load the values from the offload map (`real_param`) when they are meta;
    accelerate's own reads still see the meta tensors. Returns how many modules were changed.
    """
    changed = 0
    for module in model.modules():
        if any(getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None for h in _align_hooks(module)):
            if type(module) not in _READABLE.values():
                module.__class__ = _readable_class(type(module))
                changed += 1
    return changed


def real_state_dict(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for every entry of `model.state_dict()`, sorted by name, offloaded entries read from their offload map."""
    for name, t in sorted(model.state_dict().items()):
        if t.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            t = real_param(model.get_submodule(owner), leaf)
        yield name, t

LLAMA_LIKE = {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "olmo", "olmo2"}
SUPPORTED = sorted(LLAMA_LIKE | {"gpt2", "gpt_neox"})


GEMMA = {"gemma", "gemma2", "gemma3_text", "gemma3"}  # RMSNorm weights act as (1 + w)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def checkpoint_name(model: nn.Module) -> str:
    """The name a model was loaded under (`config._name_or_path`), else its class name."""
    return getattr(model.config, "_name_or_path", "") or type(model).__name__


def _softcap(model: nn.Module) -> Optional[float]:
    return getattr(model.config, "final_logit_softcapping", None)


def _llama_like_norm(norm: nn.Module, family: str) -> NormSpec:
    if family in GEMMA:
        return NormSpec("rmsnorm", norm.eps, plus_one=True)
    if family == "olmo":  # OlmoLayerNorm: F.layer_norm with no weight or bias and eps = 1e-5
        return NormSpec("layernorm", 1e-5)
    return NormSpec("rmsnorm", norm.variance_epsilon)


def build_adapter(model: nn.Module) -> Adapter:
    """Inspect an HF causal LM and return where its parts are. Raises on unsupported families."""
    config = _text_config(model.config)
    family = config.model_type
    make_offloaded_weights_readable(model)
    if family in LLAMA_LIKE:
        return _llama_like(model, config, family)
    if family == "gpt2":
        return _gpt2(model, config)
    if family == "gpt_neox":
        return _neox(model, config)
    raise ValueError(
        f"unsupported architecture {family!r} ({type(model).__name__}). Supported families: "
        f"{', '.join(SUPPORTED)}. An adapter is one function in interp/models/adapters.py."
    )


def _base(model: nn.Module, attr: str) -> nn.Module:
    """The decoder stack inside a *ForCausalLM (or the model itself if it is the stack)."""
    inner = getattr(model, attr, None)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no `.{attr}`: pass a *ForCausalLM model")
    # Multimodal Gemma 3 keeps the text stack one level down.
    return getattr(inner, "language_model", inner)


def _llama_like(model: nn.Module, config, family: str) -> Adapter:
    base = _base(model, "model")
    gemma_norms = hasattr(base.layers[0], "post_feedforward_layernorm")
    layers = []
    for block in base.layers:
        attn = block.self_attn
        layers.append(
            LayerParts(
                block=block,
                attn=attn,
                qkv=QKV("separate", attn.q_proj, attn.k_proj, attn.v_proj),
                o_proj=attn.o_proj,
                # Gemma 2/3 normalise each sublayer's output before adding it to the residual.
                attn_out=block.post_attention_layernorm if gemma_norms else attn,
                mlp_out=block.post_feedforward_layernorm if gemma_norms else block.mlp,
                mlp_down=block.mlp.down_proj,
                ln1=block.input_layernorm,
                ln2=block.pre_feedforward_layernorm if gemma_norms else block.post_attention_layernorm,
            )
        )
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None)
    cfg = ModelConfig(
        family=family,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        d_head=head_dim,
        d_model=config.hidden_size,
        d_vocab=config.vocab_size,
        d_mlp=config.intermediate_size,
        sliding_window=getattr(config, "sliding_window", None),
        layer_types=tuple(layer_types) if layer_types else None,
    )
    return Adapter(cfg, base.embed_tokens, None, tuple(layers), base.norm, model.get_output_embeddings(),
                   _llama_like_norm(base.norm, family), _softcap(model))


def _gpt2(model: nn.Module, config) -> Adapter:
    base = _base(model, "transformer")
    layers = tuple(
        LayerParts(
            block=b,
            attn=b.attn,
            qkv=QKV("fused_gpt2", b.attn.c_attn),
            o_proj=b.attn.c_proj,
            attn_out=b.attn,
            mlp_out=b.mlp,
            mlp_down=b.mlp.c_proj,
            ln1=b.ln_1,
            ln2=b.ln_2,
        )
        for b in base.h
    )
    cfg = ModelConfig(
        family="gpt2",
        n_layers=config.n_layer,
        n_heads=config.n_head,
        n_kv_heads=config.n_head,
        d_head=config.n_embd // config.n_head,
        d_model=config.n_embd,
        d_vocab=config.vocab_size,
        d_mlp=config.n_inner or 4 * config.n_embd,  # GPT2MLP's width
        has_pos_embed=True,
    )
    return Adapter(cfg, base.wte, base.wpe, layers, base.ln_f, model.get_output_embeddings(),
                   NormSpec("layernorm", base.ln_f.eps), _softcap(model))


def _neox(model: nn.Module, config) -> Adapter:
    base = _base(model, "gpt_neox")
    layers = tuple(
        LayerParts(
            block=b,
            attn=b.attention,
            qkv=QKV("fused_neox", b.attention.query_key_value),
            o_proj=b.attention.dense,
            attn_out=b.attention,
            mlp_out=b.mlp,
            mlp_down=b.mlp.dense_4h_to_h,
            ln1=b.input_layernorm,
            ln2=b.post_attention_layernorm,
        )
        for b in base.layers
    )
    cfg = ModelConfig(
        family="gpt_neox",
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_attention_heads,
        d_head=config.hidden_size // config.num_attention_heads,
        d_model=config.hidden_size,
        d_vocab=config.vocab_size,
        d_mlp=config.intermediate_size,
        parallel_attn_mlp=bool(config.use_parallel_residual),
    )
    return Adapter(cfg, base.embed_in, None, layers, base.final_layer_norm, model.get_output_embeddings(),
                   NormSpec("layernorm", base.final_layer_norm.eps), _softcap(model))


def split_fused_qkv(out: Tensor, layout: str, n_heads: int, d_head: int) -> list[Tensor]:
    """Views of q, k, v, each [batch, pos, head, d_head], into a fused projection's output."""
    b, s, _ = out.shape
    if layout == "fused_gpt2":
        return [t.view(b, s, n_heads, d_head) for t in out.split(n_heads * d_head, dim=-1)]
    if layout == "fused_neox":
        per_head = out.view(b, s, n_heads, 3 * d_head)
        return list(per_head.split(d_head, dim=-1))
    raise ValueError(f"unknown fused qkv layout {layout!r}")


def merge_fused_qkv(parts: list[Tensor], layout: str) -> Tensor:
    """Inverse of `split_fused_qkv`."""
    b, s = parts[0].shape[:2]
    if layout == "fused_gpt2":
        return torch.cat([p.reshape(b, s, -1) for p in parts], dim=-1)
    return torch.cat(parts, dim=-1).reshape(b, s, -1)
