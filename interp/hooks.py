"""HookedModel: TransformerLens-style hook points on an unmodified Hugging Face model.

    model = interp.load("smollm2-135m")
    logits, cache = model.run_with_cache("The Eiffel Tower is in", names_filter=lambda n: "resid" in n)
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.5.attn.hook_z", fn)])

Hook names and shapes follow TransformerLens (see DESIGN.md). Residual and sublayer hooks are
torch module hooks on the real modules; per-head q/k/v are views of the projections' outputs;
rot_q/rot_k, attn_scores, pattern and z live in the attention function registered with
transformers (`interp.attention`); result is computed from z and the output projection's
weights. With nothing attached, the forward is the HF forward.
"""

from __future__ import annotations

import contextlib
import hashlib
from functools import partial
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import attention, sites
from .activation_cache import ActivationCache
from .hook_points import HookFn, HookPoint, get_act_name, unknown_hook_error
from .models.adapters import (
    Adapter,
    ModelConfig,
    build_adapter,
    checkpoint_name,
    merge_fused_qkv,
    real_state_dict,
    split_fused_qkv,
)

Input = Union[str, Sequence[str], Tensor]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
HookSpec = Sequence[tuple[Union[str, Callable[[str], bool]], HookFn]]

ROPE_FAMILIES_WITHOUT = {"gpt2"}  # families whose q/k are not rotated: no hook_rot_q/hook_rot_k
# Left out of names_filter=None, as TransformerLens leaves them out by default: hook_result is
# n_heads x the size of the residual stream and costs n_heads x an output projection (on
# SmolLM2 it made a full cache take 1.24x the time of one without it). Ask for it by name, or
# get per-head writes from z with `cache.stack_head_results()`.
OPT_IN_HOOKS = ("attn.hook_result",)


def _require_grad(module: nn.Module, args, output: Tensor) -> Optional[Tensor]:
    if torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


@contextlib.contextmanager
def contiguous_unembed_input(hf_model: nn.Module) -> Iterator[None]:
    """Give the unembedding a contiguous input while `logits_to_keep` is in use.

    HF slices the kept positions out of the final hidden states, a strided view; torch's
    matmul then runs the [rows, kept, d_model] x [d_vocab, d_model]^T product as a batched
    matmul over an expanded weight, several times slower than one matrix product (0.87 s
    against 0.14 s for 72 rows on SmolLM2). The values are the same.
    """
    unembed = hf_model.get_output_embeddings()
    handle = unembed.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _keeps_some(logits_to_keep) -> bool:
    """Whether HF's `logits_to_keep` selects a subset of positions (an int > 0 or a tensor of positions)."""
    return isinstance(logits_to_keep, Tensor) or bool(logits_to_keep)


def _texts(input) -> list[str]:
    """A prompt or a list (any iterable) of prompts as a list of strings."""
    if isinstance(input, str):
        return [input]
    try:
        texts = list(input)
    except TypeError:
        texts = None
    if texts is not None and all(isinstance(t, str) for t in texts):
        if not texts:
            raise ValueError("no prompts: the list of strings is empty")
        return texts
    kinds = f" of {', '.join(sorted({type(t).__name__ for t in texts}))}" if texts else ""
    raise TypeError(
        f"input must be a string, a list of strings or a tensor of token ids, got {type(input).__name__}{kinds} "
        "(for ids, pass torch.tensor(ids))"
    )


def _check_not_empty_texts(texts: list[str], mask: Tensor) -> None:
    lengths = mask.sum(dim=1).tolist() if mask.numel() else [0] * len(texts)
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} ({texts[i]!r}) tokenizes to no tokens: there is nothing to run; pass non-empty text")


def check_tokens(tokens: Tensor, d_vocab: int) -> Tensor:
    """Token ids as Long[Tensor, "batch pos"]: rank 1 (one prompt) or 2, integer, non-empty, inside [0, d_vocab)."""
    if tokens.ndim not in (1, 2):
        raise ValueError(
            f"token ids must be [pos] (one prompt) or [batch, pos], got a tensor of shape {tuple(tokens.shape)}; "
            "drop the extra dimensions (e.g. tokens.squeeze(0) or tokens.reshape(-1, tokens.shape[-1]))"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"token ids must be integers (torch.long), got {tokens.dtype}; convert with tokens.long()")
    tokens = tokens if tokens.ndim == 2 else tokens.unsqueeze(0)
    if tokens.numel() == 0:
        raise ValueError(
            f"empty input: the token ids have shape {tuple(tokens.shape)}, and a forward needs at least one prompt "
            "of at least one token"
        )
    lo, hi = torch.aminmax(tokens)
    if int(lo) < 0 or int(hi) >= d_vocab:
        where = ((tokens < 0) | (tokens >= d_vocab)).nonzero()[0].tolist()
        raise ValueError(
            f"token id {int(tokens[where[0], where[1]])} at [{where[0]}, {where[1]}] is outside the model's vocabulary "
            f"of {d_vocab} ids (valid ids are 0 to {d_vocab - 1}); were the ids made by another model's tokenizer?"
        )
    return tokens.long()


def check_mask(mask: Tensor, tokens: Tensor) -> Tensor:
    """An attention mask of the tokens' shape, holding 0 (padding) and 1 (token), with a token in every row."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor of the tokens' shape {tuple(tokens.shape)}, got {type(mask).__name__}")
    if mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but the tokens have shape {tuple(tokens.shape)}: "
            "the mask needs one 0/1 entry per token (use the mask the tokenizer returned with these tokens)"
        )
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"attention_mask must hold 0 (padding) and 1 (token), found values {mask.unique().tolist()[:8]}")
    empty = (mask.sum(dim=1) == 0).nonzero()
    if len(empty):
        raise ValueError(f"row {int(empty[0])} of attention_mask is all zeros: that prompt has no tokens to run")
    return mask


def left_padded(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The same prompts with their padding moved to the left (what decoding needs): Long[Tensor, "batch pos"] twice."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # pads (0) first, tokens keep their order
    return tokens.gather(1, order), mask.gather(1, order)


class HookedModel(nn.Module):
    """A causal LM from transformers with named, live hook points.

    Attributes: `hf_model` (the untouched PreTrainedModel), `tokenizer`, `cfg` (`ModelConfig`),
    `adapter` (where the parts are), `hook_dict` (name -> HookPoint).
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, name: Optional[str] = None):
        super().__init__()
        self.hf_model = hf_model.eval()
        self.hf_model.requires_grad_(False)  # analysis, not training: gradients flow to activations only
        self.tokenizer = tokenizer
        self.name = name or checkpoint_name(hf_model)
        self.adapter: Adapter = build_adapter(hf_model)
        self.cfg: ModelConfig = self.adapter.cfg
        self.hook_dict: dict[str, HookPoint] = {}
        self._sites: list[Union[sites.Site, sites.ResultSite]] = []
        self._fingerprint: Optional[tuple] = None
        self._grad_handle: Optional[torch.utils.hooks.RemovableHandle] = None
        self._wire()
        attention.switch_to_hooked(self.hf_model)

    # ------------------------------------------------------------------ wiring
    def _point(self, name: str) -> HookPoint:
        self.hook_dict[name] = HookPoint(name)
        return self.hook_dict[name]

    def _site(self, module: nn.Module, kind: str, state: Optional[dict] = None) -> sites.Site:
        site = sites.Site(module, kind, state=state if state is not None else {})
        self._sites.append(site)
        return site

    def _wire(self) -> None:
        a, c = self.adapter, self.cfg
        self._site(a.embed, "post").add([p := self._point("hook_embed")], sites.whole(p))
        if a.pos_embed is not None:
            self._site(a.pos_embed, "post").add([p := self._point("hook_pos_embed")], sites.whole(p))
        base = "sdpa" if attention.base_implementation(self.hf_model) == "sdpa" else "eager"
        for l, parts in enumerate(a.layers):
            state: dict = {}
            resid_pre = self._point(get_act_name("resid_pre", l))
            attn_out = self._point(get_act_name("attn_out", l))
            mlp_out = self._point(get_act_name("mlp_out", l))
            resid_post = self._point(get_act_name("resid_post", l))

            points_for_pre = [resid_pre]
            attn_out_site = self._site(parts.attn_out, "post", state)
            attn_out_site.add([attn_out], sites.whole(attn_out))
            if not c.parallel_attn_mlp:  # parallel blocks have no resid_mid (as in TransformerLens)
                mid = self._point(get_act_name("resid_mid", l))
                points_for_pre.append(mid)
                attn_out_site.add([mid], sites.resid_mid(mid))
            self._site(parts.block, "pre", state).add(points_for_pre, sites.remember("resid_pre", resid_pre))
            self._site(parts.mlp_out, "post").add([mlp_out], sites.whole(mlp_out))
            self._site(parts.block, "post").add([resid_post], sites.whole(resid_post))
            for ln_name, module in (("ln1", parts.ln1), ("ln2", parts.ln2)):
                self._site(module, "post").add([p := self._point(get_act_name("normalized", l, ln_name))], sites.whole(p))
            self._site(parts.mlp_down, "pre").add([p := self._point(get_act_name("post", l))], sites.whole(p))

            q, k, v = (self._point(get_act_name(x, l)) for x in "qkv")
            if parts.qkv.layout == "separate":
                for point, module, n in ((q, parts.qkv.q, c.n_heads), (k, parts.qkv.k, c.n_kv_heads), (v, parts.qkv.v, c.n_kv_heads)):
                    self._site(module, "post").add([point], sites.heads(point, n, c.d_head))
            else:
                split = partial(split_fused_qkv, layout=parts.qkv.layout, n_heads=c.n_heads, d_head=c.d_head)
                merge = partial(merge_fused_qkv, layout=parts.qkv.layout)
                self._site(parts.qkv.q, "post").add([q, k, v], sites.fused_heads([q, k, v], split, merge))

            rotated = c.family not in ROPE_FAMILIES_WITHOUT
            rot_q, rot_k = get_act_name("rot_q", l), get_act_name("rot_k", l)
            hooks = attention.AttentionHooks(
                rot_q=self._point(rot_q) if rotated else HookPoint(rot_q),
                rot_k=self._point(rot_k) if rotated else HookPoint(rot_k),
                attn_scores=self._point(get_act_name("attn_scores", l)),
                pattern=self._point(get_act_name("pattern", l)),
                z=self._point(get_act_name("z", l)),
                base=base,
            )
            attention.register_attention(parts.attn, hooks)
            result = self._point(get_act_name("result", l))
            compute = sites.head_results(result, partial(a.W_O, l), partial(a.b_O, l), c.n_heads)
            self._sites.append(sites.ResultSite(parts.o_proj, result, compute))
        self._site(a.final_norm, "post").add([p := self._point("ln_final.hook_normalized")], sites.whole(p))

    # ------------------------------------------------------------------ hook management
    def hook_names(self) -> list[str]:
        return list(self.hook_dict)

    def resolve_names(self, names_filter: NamesFilter) -> list[str]:
        """Hook names selected by None (all but the opt-in `OPT_IN_HOOKS`), a name, a list of names or a predicate."""
        if names_filter is None:
            return [n for n in self.hook_dict if not n.endswith(OPT_IN_HOOKS)]
        if callable(names_filter):
            return [n for n in self.hook_dict if names_filter(n)]
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        for n in names:
            if n not in self.hook_dict:
                raise unknown_hook_error(n, self.hook_names())
        return names

    def add_hook(self, name: Union[str, Callable[[str], bool]], fn: HookFn, dir: str = "fwd", edits: bool = True) -> None:
        """Attach `fn(tensor, hook)` to one hook point (or to every name a predicate selects)."""
        for n in self.resolve_names(name):
            self.hook_dict[n].add(fn, dir, edits)
        self._sync()

    def remove_hook(self, name: Union[str, Callable[[str], bool]], fn: HookFn, dir: str = "fwd") -> None:
        for n in self.resolve_names(name):
            self.hook_dict[n].remove(fn, dir)
        self._sync()

    def reset_hooks(self) -> None:
        for p in self.hook_dict.values():
            p.clear()
        self._sync()

    def _sync(self) -> None:
        for s in self._sites:
            s.sync()
        # Parameters are frozen, so a backward hook needs the activations themselves to carry
        # gradients: make the embedding output a leaf that requires grad while any is attached.
        wants_grad = any(p.bwd for p in self.hook_dict.values())
        if wants_grad and self._grad_handle is None:
            self._grad_handle = self.adapter.embed.register_forward_hook(_require_grad)
        elif not wants_grad and self._grad_handle is not None:
            self._grad_handle.remove()
            self._grad_handle = None

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: HookSpec = (), bwd_hooks: HookSpec = ()) -> Iterator["HookedModel"]:
        """Attach hooks for the duration of a `with` block; they are removed on exit, errors included."""
        # Torch hooks are installed once for the whole set, not once per hook: syncing walks every
        # site, and experiments attach hundreds of hooks per forward.
        added = []
        try:
            for direction, spec in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, fn in spec:
                    for n in self.resolve_names(name):
                        self.hook_dict[n].add(fn, direction, True)
                        added.append((n, fn, direction))
            self._sync()
            yield self
        finally:
            for n, fn, direction in added:
                self.hook_dict[n].remove(fn, direction)
            self._sync()

    @contextlib.contextmanager
    def kernel_controls(self, controls: dict[int, Any]) -> Iterator["HookedModel"]:
        """Run attention of chosen layers through the fused kernel with per-head controls.

        controls: {layer: interp.kernels.hf.KernelControls(head_gate=..., head_uniform=..., stats=..., on_stats=...)}.
        Gates and uniform heads may be [n_heads] or [batch, n_heads] (a different ablation per
        batch row). A layer that also has a pattern hook attached runs eager, without the controls.
        """
        from .kernels.hf import controlled

        for layer in controls:
            if not 0 <= layer < self.cfg.n_layers:
                raise ValueError(f"layer {layer} outside the model's {self.cfg.n_layers} layers")
        with controlled({self.adapter.layers[l].attn: c for l, c in controls.items()}):
            yield self

    # ------------------------------------------------------------------ tokens
    def require_tokenizer(self) -> Any:
        """The model's tokenizer; a ValueError saying what to do when it was loaded without one."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass token ids, or load it with a tokenizer")
        return self.tokenizer

    def to_tokens(self, input: Union[str, Sequence[str]], prepend_bos: Optional[bool] = None) -> Tensor:
        """Token ids [batch, pos]. BOS follows the tokenizer's own convention unless `prepend_bos` says.

        Lists of prompts are right-padded; use `to_tokens_and_mask` to get the mask too.
        """
        return self.to_tokens_and_mask(input, prepend_bos)[0]

    def to_tokens_and_mask(self, input: Union[str, Sequence[str]], prepend_bos: Optional[bool] = None) -> tuple[Tensor, Tensor]:
        tok = self.require_tokenizer()
        texts = [input] if isinstance(input, str) else list(input)
        rows = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
        bos = tok.bos_token_id
        if prepend_bos is True and bos is not None:
            rows = [r if r[:1] == [bos] else [bos] + r for r in rows]
        elif prepend_bos is False and bos is not None:
            rows = [r[1:] if r[:1] == [bos] else r for r in rows]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return tokens.to(self.device), mask.to(self.device)

    def to_str_tokens(self, input: Union[str, Tensor], prepend_bos: Optional[bool] = None) -> list[str]:
        """One string per token of a single prompt."""
        ids = self.to_tokens(input, prepend_bos)[0] if isinstance(input, str) else input.reshape(-1)
        tok = self.require_tokenizer()
        return [tok.decode([int(t)]) for t in ids]

    def to_string(self, tokens: Tensor) -> Union[str, list[str]]:
        tok = self.require_tokenizer()
        if tokens.ndim == 1:
            return tok.decode(tokens.tolist())
        return [tok.decode(r.tolist()) for r in tokens]

    def prepare_inputs(self, input: Input, attention_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Checked token ids Long[Tensor, "batch pos"] and attention mask (or None), on the model's device.

        The one place where every entry point (forward, run_with_hooks, run_with_cache, generate,
        the patching sweeps) checks what it is given. A string or a list of strings is tokenized
        (lists are right-padded; the mask comes back when some prompt is padded). A tensor must
        hold integer ids inside the vocabulary, shaped [pos] (one prompt) or [batch, pos], with at
        least one position. A mask must have the tokens' shape, hold 0/1 and keep a token per row.
        """
        if isinstance(input, Tensor):
            tokens = check_tokens(input, self.cfg.d_vocab)
            if isinstance(attention_mask, Tensor) and input.ndim == 1 and attention_mask.ndim == 1:
                attention_mask = attention_mask.unsqueeze(0)
        else:
            texts = _texts(input)
            tokens, mask = self.to_tokens_and_mask(texts)
            _check_not_empty_texts(texts, mask)
            tokens = check_tokens(tokens, self.cfg.d_vocab)
            if attention_mask is None and not bool(mask.all()):
                attention_mask = mask
        if attention_mask is not None:
            attention_mask = check_mask(attention_mask, tokens).to(self.device)
        return tokens.to(self.device), attention_mask

    # ------------------------------------------------------------------ running
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device the embedding computes on (its execution device when the model is
        dispatched with a device_map; with layers offloaded, never `meta`)."""
        return self.adapter.input_device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    def forward(self, input: Input, attention_mask: Optional[Tensor] = None, **kwargs: Any) -> Tensor:
        """Logits [batch, pos, d_vocab] of the HF model, with whatever hooks are attached."""
        tokens, attention_mask = self.prepare_inputs(input, attention_mask)
        kwargs.setdefault("use_cache", False)
        keep = contiguous_unembed_input(self.hf_model) if _keeps_some(kwargs.get("logits_to_keep")) else contextlib.nullcontext()
        with keep:
            return self.hf_model(input_ids=tokens, attention_mask=attention_mask, **kwargs).logits

    def run_with_hooks(
        self,
        input: Input,
        fwd_hooks: HookSpec = (),
        bwd_hooks: HookSpec = (),
        attention_mask: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        """Forward with temporary hooks; they are detached when the forward returns.

        Backward hooks are armed on the activations during the forward, so they still fire when
        the caller runs `.backward()` on the returned logits.
        """
        with self.hooks(fwd_hooks, bwd_hooks):
            return self.forward(input, attention_mask, **kwargs)

    def run_with_cache(
        self,
        input: Input,
        names_filter: NamesFilter = None,
        device: Union[None, str, torch.device] = None,
        remove_batch_dim: bool = False,
        attention_mask: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> tuple[Tensor, ActivationCache]:
        """Forward that records activations. Returns (logits, ActivationCache).

        Only the selected hook points are recorded, so `names_filter` is also how memory is
        kept down; patterns make attention run on the eager path for those layers only.
        device: move every cached tensor there as it is recorded (a model split over devices
        with a device_map records each layer on its own device; this gathers them). The logits
        stay where the model returns them.
        """
        names = self.resolve_names(names_filter)
        store: dict[str, Tensor] = {}
        device = torch.device(device) if device is not None else None

        def save(x: Tensor, hook: HookPoint) -> None:
            t = x.detach()
            if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                t = t.clone()  # a view into a larger tensor (fused qkv): don't keep the rest alive
            store[hook.name] = t.to(device) if device is not None else t

        for n in names:
            self.hook_dict[n].add(save, "fwd", edits=False)
        self._sync()
        try:
            logits = self.forward(input, attention_mask, **kwargs)
        finally:
            for n in names:
                self.hook_dict[n].remove(save)
            self._sync()
        cache = ActivationCache({n: store[n] for n in names if n in store}, model=self)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return logits, cache

    @torch.no_grad()
    def generate(
        self,
        input: Input,
        max_new_tokens: int = 16,
        return_type: str = "input",
        attention_mask: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Union[str, list[str], Tensor]:
        """Greedy decoding (HF's `generate`, KV cache on) with the attached hooks active.

        Output follows TransformerLens's `generate` (return_type="input"): a string in gives a
        string out (prompt and continuation, decoded without special tokens), a list of strings
        gives a list of strings, token ids in give token ids out, Long[Tensor, "batch pos+new"].
        `return_type="str"` or `"tokens"` asks for one form whatever the input. Prompts of unequal
        length are padded on the left for decoding. Other keyword arguments go to HF's `generate`.
        """
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        tokens, mask = self.prepare_inputs(input, attention_mask)
        if mask is None:
            mask = torch.ones_like(tokens)
        elif not isinstance(input, Tensor):
            tokens, mask = left_padded(tokens, mask)
        kwargs.setdefault("do_sample", False)
        pad = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        out = self.hf_model.generate(
            input_ids=tokens, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs
        )
        as_text = return_type == "str" or (return_type == "input" and not isinstance(input, Tensor))
        if not as_text:
            return out
        texts = self._decode_generated(out, mask)
        return texts[0] if isinstance(input, str) else texts

    def _decode_generated(self, out: Tensor, prompt_mask: Tensor) -> list[str]:
        """One string per row of generate's output, the prompt's padding left out."""
        tok = self.require_tokenizer()
        new = out.shape[1] - prompt_mask.shape[1]
        keep = torch.cat([prompt_mask.bool(), torch.ones(out.shape[0], new, dtype=torch.bool, device=out.device)], dim=1)
        return [tok.decode(row[k].tolist(), skip_special_tokens=True) for row, k in zip(out, keep)]

    # ------------------------------------------------------------------ model pieces used by experiments
    def apply_final_norm(self, resid: Tensor) -> Tensor:
        """The model's own final norm, recomputed on any [..., d_model] tensor."""
        return self.adapter.final_norm(resid)

    def apply_final_norm_frozen(self, stack: Tensor, resid: Tensor) -> Tensor:
        """The final norm's map at `resid`, its scale frozen, applied to each component of `stack`
        [component, ..., d_model] (no bias): the components still sum to the normed residual.
        The adapter's `apply_norm_frozen`, one implementation per norm kind."""
        return self.adapter.apply_norm_frozen(stack, resid)

    def unembed(self, normed: Tensor) -> Tensor:
        """Logits from a final-normed residual, including any final logit soft-capping."""
        return self.adapter.apply_unembed(normed)

    def W_O(self, layer: int) -> Tensor:
        """[n_heads, d_head, d_model]"""
        return self.adapter.W_O(layer)

    def b_O(self, layer: int) -> Optional[Tensor]:
        return self.adapter.b_O(layer)

    def fingerprint(self) -> str:
        """sha256 over parameter names, shapes, dtypes and values.

        Memoised on the parameters' storage, dtype and autograd version counters, so an in-place
        edit, a dtype change or new weights give a new fingerprint (and so new cache keys).
        """
        state = sorted(self.hf_model.state_dict().items())
        stamp = tuple((n, t.data_ptr(), t.dtype, t._version) for n, t in state)
        if self._fingerprint is None or self._fingerprint[0] != stamp:
            h = hashlib.sha256()
            for name, t in real_state_dict(self.hf_model):  # offloaded weights read from disk: the in-memory fingerprint
                h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
                h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
            self._fingerprint = (stamp, h.hexdigest())
        return self._fingerprint[1]

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"HookedModel({self.name!r}, family={c.family}, layers={c.n_layers}, heads={c.n_heads}, "
            f"kv_heads={c.n_kv_heads}, d_model={c.d_model}, hooks={len(self.hook_dict)})"
        )
