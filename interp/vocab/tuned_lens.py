"""Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens").

One affine translator per layer, applied to the residual stream entering block l, then the
model's own final norm and unembedding:

    logits_l = unembed(final_norm(h_l + A_l h_l + b_l))        l = 0 .. n_layers - 1

A_l and b_l start at zero, so an untrained lens is the logit lens exactly (the residual
parametrisation of the paper's code: weight decay pulls towards the identity). The last
component (`final_post`, the last block's output) has no translator: it is the model's output.
Training minimises KL(final || lens) of the next-token distributions, averaged over tokens and
summed over layers, with the paper's recipe: SGD with Nesterov momentum 0.9, learning rate 1.0
(torch's lr = 1.0 * (1 - momentum), as the reference code does), linear decay to 0, weight
decay 1e-3, gradient norm clipped to 1.0 over all translators.

    lens = train_tuned_lens(model, chunks, TrainConfig(steps=50), checkpoint_dir="lens/")
    lens.save("lens/");  lens = TunedLens.load("lens/", model)
    logit_lens_frame(model, "The Eiffel Tower is in", lens=lens)

On disk (a folder): `params.safetensors` (translators.{l}.weight / .bias, float32) and
`config.json` (format, model, fingerprint, d_model, n_layers, params_sha256, training), each
written atomically; `config.json` last, with the sha256 of the params file it belongs to.
Training also keeps `checkpoint.safetensors` there (translators, momentum buffers, step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import atomic_write, atomic_write_text, remove_stale_temps
from ..hook_points import get_act_name
from ..hooks import HookedModel
from ..lens import lens_logits as logit_lens_logits

FORMAT = "interp.tuned_lens/1"
CHECKPOINT_FORMAT = "interp.tuned_lens.checkpoint/1"
CONFIG_NAME = "config.json"
PARAMS_NAME = "params.safetensors"
CHECKPOINT_NAME = "checkpoint.safetensors"
PathLike = Union[str, Path]


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors_sha256(tensors: Tensor) -> str:
    return hashlib.sha256(tensors.contiguous().cpu().numpy().tobytes()).hexdigest()


class TunedLens(nn.Module):
    """Per-layer affine translators h -> h + A_l h + b_l (float32), zero-initialised (= the logit lens).

    `translators[l]` acts on `blocks.{l}.hook_resid_pre`, l < n_layers; layer n_layers (the
    model's output) is left as it is. `model_name` / `fingerprint` name the weights it was made for.
    """

    def __init__(self, d_model: int, n_layers: int, model_name: str = "", fingerprint: str = "",
                 training: Optional[dict] = None) -> None:
        super().__init__()
        self.d_model, self.n_layers = d_model, n_layers
        self.model_name, self.fingerprint = model_name, fingerprint
        self.training_info: dict = dict(training or {})
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model, dtype=torch.float32) for _ in range(n_layers))
        for t in self.translators:
            nn.init.zeros_(t.weight)
            nn.init.zeros_(t.bias)

    @classmethod
    def for_model(cls, model: HookedModel) -> "TunedLens":
        """An identity lens sized for `model`, stamped with its name and weight fingerprint."""
        return cls(model.cfg.d_model, model.cfg.n_layers, model.name or "", model.fingerprint())

    # ---------------------------------------------------------------- reading
    def transform(self, resid: Tensor, layer: int) -> Tensor:
        """h + A_l h + b_l: Float[Tensor, "... d_model"] -> same shape and dtype; layer n_layers: unchanged."""
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer {layer} is outside 0..{self.n_layers} (this lens has {self.n_layers} translators)")
        if layer == self.n_layers:
            return resid
        t = self.translators[layer]
        h = resid.float()
        return (h + nn.functional.linear(h, t.weight.to(h.device), t.bias.to(h.device))).to(resid.dtype)

    def lens_logits(self, model: HookedModel, resid: Tensor, layer: int) -> Tensor:
        """unembed(final_norm(translated resid)): Float[Tensor, "... d_model"] -> Float[Tensor, "... d_vocab"]."""
        return logit_lens_logits(model, self.transform(resid, layer))

    def check_model(self, model: HookedModel, check_fingerprint: bool = True) -> None:
        """Raise ValueError unless `model` has this lens' d_model and n_layers (and weights, by fingerprint)."""
        cfg = model.cfg
        made_for = f"{self.model_name or 'a model'} (d_model {self.d_model}, {self.n_layers} layers)"
        if (cfg.d_model, cfg.n_layers) != (self.d_model, self.n_layers):
            raise ValueError(f"this tuned lens was trained for {made_for}; {model.name or 'this model'} has d_model "
                             f"{cfg.d_model} and {cfg.n_layers} layers; train a lens for it: interp tuned-lens train MODEL --out DIR")
        if check_fingerprint and self.fingerprint and self.fingerprint != model.fingerprint():
            raise ValueError(f"this tuned lens was trained for {made_for} with weight fingerprint {self.fingerprint[:12]}..., "
                             f"but {model.name or 'this model'} has fingerprint {model.fingerprint()[:12]}... "
                             "(other weights, or another dtype: the fingerprint includes it); a lens only fits the weights "
                             "it was trained on: load the model as it was for training, or train a lens for this one")

    # ---------------------------------------------------------------- disk
    def tensors(self) -> dict[str, Tensor]:
        """{"translators.{l}.weight" / ".bias": float32 CPU tensor}."""
        return {f"translators.{k}": v.detach().cpu().contiguous() for k, v in self.translators.state_dict().items()}

    def config(self) -> dict:
        return {"format": FORMAT, "model": self.model_name, "fingerprint": self.fingerprint,
                "d_model": self.d_model, "n_layers": self.n_layers, "training": self.training_info}

    def save(self, path: PathLike) -> Path:
        """Write the folder `path` (created if absent): params.safetensors, then config.json (atomic each)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        params = path / PARAMS_NAME
        atomic_write(params, lambda tmp: save_file(self.tensors(), str(tmp), metadata={"format": FORMAT}), suffix=".safetensors")
        config = {**self.config(), "params_sha256": _sha256_file(params)}
        atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: PathLike, model: Optional[HookedModel] = None, check_fingerprint: bool = True) -> "TunedLens":
        """Read a folder written by `save`; with `model`, refuse it unless it was trained for that model."""
        path = Path(path)
        config_path, params = path / CONFIG_NAME, path / PARAMS_NAME
        for f in (config_path, params):
            if not f.is_file():
                raise FileNotFoundError(f"{path} is not a tuned lens folder: {f.name} is missing "
                                        "(make one with: interp tuned-lens train MODEL --out DIR)")
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: format {config.get('format')!r} is not {FORMAT!r}")
        if config.get("params_sha256") != _sha256_file(params):
            raise ValueError(f"{params} does not match the sha256 in {config_path} (a damaged or half-replaced lens); "
                             "save or train it again")
        lens = cls(int(config["d_model"]), int(config["n_layers"]), config.get("model", ""), config.get("fingerprint", ""),
                   config.get("training"))
        lens._load_tensors(load_file(str(params)), str(params))
        if model is not None:
            lens.check_model(model, check_fingerprint)
        return lens

    def _load_tensors(self, tensors: Mapping[str, Tensor], where: str) -> None:
        state = {k.removeprefix("translators."): v for k, v in tensors.items() if k.startswith("translators.")}
        try:
            self.translators.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{where}: the translators do not fit d_model {self.d_model} x {self.n_layers} layers: {e}") from None


# ---------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe (Belrose et al. 2023, section 3 and their train_loop.py), scaled by `steps`,
    `batch_size` (sequences per step) and `seq_len`. They use 250 steps of 2**18 tokens."""

    steps: int = 250
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1.0  # in the reference code's units: torch's SGD lr is lr * (1 - momentum)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def batch_indices(n_chunks: int, step: int, batch_size: int, seed: int) -> Tensor:
    """The chunk indices of one step: a seeded permutation per epoch, read in order (a function of step only)."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n_chunks)
        perm = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[j]))
    return torch.tensor(out, dtype=torch.long)


def _residuals_and_final(model: HookedModel, tokens: Tensor) -> tuple[list[Tensor], Tensor]:
    """resid_pre of every layer [batch, pos, d_model] and the final log-probs [batch, pos, d_vocab] (float32)."""
    names = [get_act_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names)
    return [cache[n] for n in names], logits.float().log_softmax(-1)


def kl_to_final(final: Tensor, logits: Tensor) -> Tensor:
    """KL(final || softmax(logits)) per token, nats: final log-probs and lens logits [..., d_vocab] -> [...]."""
    return (final.exp() * (final - logits.float().log_softmax(-1))).sum(-1)


class _FrozenModel:
    """Within the block the model's parameters need no gradient (only the translators train); restored after."""

    def __init__(self, model: HookedModel) -> None:
        self.params = [p for p in model.hf_model.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)


def _train_step(model: HookedModel, lens: TunedLens, opt: torch.optim.Optimizer, tokens: Tensor, lr: float,
                clip: float) -> list[float]:
    """One optimiser step on one batch; returns the per-layer mean KL before the step."""
    resids, final = _residuals_and_final(model, tokens)
    opt.zero_grad(set_to_none=True)
    losses = []
    with torch.enable_grad():
        for layer, h in enumerate(resids):  # layer by layer, as the reference code, to bound memory
            loss = kl_to_final(final, lens.lens_logits(model, h, layer)).mean()
            loss.backward()
            losses.append(loss.item())
    nn.utils.clip_grad_norm_(lens.parameters(), clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return losses


def _optimizer(lens: TunedLens, config: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(lens.parameters(), lr=config.lr * (1 - config.momentum), momentum=config.momentum,
                           nesterov=True, weight_decay=config.weight_decay)


def _lr_at(config: TrainConfig, step: int) -> float:
    """Linear decay from lr to 0 over `steps`, no warm-up (the reference's SGD default), in torch's units."""
    return config.lr * (1 - config.momentum) * (1 - step / config.steps)


def _run_identity(model: HookedModel, chunks: Tensor, config: TrainConfig) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "checkpoint_every"}
    return {"fingerprint": model.fingerprint(), "config": settings, "chunks_sha256": _tensors_sha256(chunks),
            "chunks_shape": list(chunks.shape)}


def save_checkpoint(path: Path, lens: TunedLens, opt: torch.optim.Optimizer, step: int, run: dict) -> None:
    """translators + momentum buffers + step, in one safetensors file written atomically."""
    tensors = lens.tensors()
    for i, p in enumerate(lens.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf.detach().cpu().contiguous()
    meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "run": json.dumps(run, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), suffix=".safetensors")


def load_checkpoint(path: Path, lens: TunedLens, opt: torch.optim.Optimizer, run: dict) -> int:
    """Restore translators and momentum from `path`; returns the number of steps done. Refuses another run's checkpoint."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a tuned-lens checkpoint (format {meta.get('format')!r})")
    saved = json.loads(meta["run"])
    if saved != json.loads(json.dumps(run, sort_keys=True)):
        diff = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
        raise ValueError(f"{path} belongs to another training run (different {', '.join(diff)}); "
                         "use another --out folder, or delete the checkpoint to start again")
    tensors = load_file(str(path))
    lens._load_tensors(tensors, str(path))
    for i, p in enumerate(lens.parameters()):
        if f"momentum.{i}" in tensors:
            opt.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(p.device)
    return int(meta["step"])


def train_tuned_lens(
    model: HookedModel,
    chunks: Tensor,
    config: TrainConfig = TrainConfig(),
    checkpoint_dir: Optional[PathLike] = None,
    progress: bool = False,
    on_step: Optional[Callable[[int, list[float]], None]] = None,
) -> TunedLens:
    """Train a tuned lens on `chunks` (Long[Tensor, "chunk seq_len"], e.g. `lens_text.lens_splits`).

    Step s reads the chunks `batch_indices(len(chunks), s, batch_size, seed)`, so a run is a
    deterministic function of (model, chunks, config). With `checkpoint_dir`, translators,
    momentum and step are saved atomically every `checkpoint_every` steps and at the end, and a
    new call with the same arguments continues from the last checkpoint (same result as an
    uninterrupted run). `on_step(step, per-layer losses)` is called after each step.
    """
    if chunks.ndim != 2 or chunks.dtype != torch.long:
        raise ValueError(f"chunks must be Long[Tensor, 'chunk seq_len'], got {chunks.dtype} {tuple(chunks.shape)}")
    chunks = chunks[:, : config.seq_len]
    lens = TunedLens.for_model(model).to(model.device)
    opt = _optimizer(lens, config)
    run = _run_identity(model, chunks, config)
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start = 0
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(ckpt.parent)
        if ckpt.is_file():
            start = load_checkpoint(ckpt, lens, opt, run)
    bar = _progress(progress, start, config.steps)
    losses: list[float] = []
    with _FrozenModel(model):
        for step in range(start, config.steps):
            tokens = chunks[batch_indices(len(chunks), step, config.batch_size, config.seed)]
            losses = _train_step(model, lens, opt, tokens.to(model.device), _lr_at(config, step), config.clip)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{sum(losses) / len(losses):.3f}")
            if ckpt is not None and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps):
                save_checkpoint(ckpt, lens, opt, step + 1, run)
            if on_step is not None:
                on_step(step, losses)
    if bar is not None:
        bar.close()
    lens.training_info = {**run["config"], "tokens_per_step": config.batch_size * chunks.shape[1],
                          "chunks_sha256": run["chunks_sha256"], "last_step_mean_kl": sum(losses) / len(losses) if losses else None}
    return lens.cpu()


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="tuned lens", unit="step")


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def lens_kl_table(model: HookedModel, chunks: Tensor, lenses: Mapping[str, Any], batch_size: int = 4) -> pd.DataFrame:
    """Per-layer mean KL(final || lens) (nats) and top-1 agreement with the final distribution, over every token of `chunks`.

    `lenses`: {name: None (the logit lens) or an object with `lens_logits(model, resid, layer)`}.
    Returns one row per (lens, layer): lens, layer (0..n_layers-1, resid_pre), kl_to_final, top1_agreement, n_tokens.
    """
    n_layers = model.cfg.n_layers
    kl = {name: torch.zeros(n_layers, dtype=torch.float64) for name in lenses}
    agree = {name: torch.zeros(n_layers, dtype=torch.float64) for name in lenses}
    n = 0
    for start in range(0, len(chunks), batch_size):
        resids, final = _residuals_and_final(model, chunks[start : start + batch_size])
        top = final.argmax(-1)
        n += top.numel()
        for name, lens in lenses.items():
            for layer, h in enumerate(resids):
                logits = logit_lens_logits(model, h) if lens is None else lens.lens_logits(model, h, layer)
                kl[name][layer] += kl_to_final(final, logits).double().sum().item()
                agree[name][layer] += (logits.argmax(-1) == top).sum().item()
    rows = [{"lens": name, "layer": layer, "kl_to_final": kl[name][layer].item() / n,
             "top1_agreement": agree[name][layer].item() / n, "n_tokens": n}
            for name in lenses for layer in range(n_layers)]
    return pd.DataFrame(rows)
