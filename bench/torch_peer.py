"""The PyTorch peer of the EEES image model, for bench.vs_torch: what a PyTorch code base would run.

The tower is OpenAI's own clip/model.py ModifiedResNet (from the clip-anytorch package, loaded by
file path: its clip/__init__.py imports torchvision, which is not installed), changed as EEES
changes it: layer4's first block without its stride-2 average pools (last stride 1), a second
stem (conv1..bn3) for infrared images, the attention pool's positional embedding resized to the
feature grid with F.interpolate. On top, the heads of SPEC section 1 (GeM + BNNeck + bias-free
classifier for f; BNNeck + classifier for v), the test-time feature with the mirrored image, and
the identity + WRT triplet loss with torch.optim.Adam (L2 weight decay, classifiers at 2x the
learning rate, BNNeck biases frozen), as eees_jax's step with the description terms off.

`to_flax_variables` maps the peer's state dict to the Flax EEES variables through the project's
converter (eees_jax.weights.convert_openai_state_dict), so both frameworks hold the same weights.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# CLIP's normalisation (data_pipelines.ops), per RGB channel.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)
_STEM = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")


@functools.lru_cache(maxsize=None)
def openai_clip_model():
  """OpenAI's clip/model.py as a module, read from the installed clip-anytorch package."""
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("OpenAI's clip package (clip-anytorch, requirements-nodeps.txt) is not "
                       "installed: `pip install --no-deps -r requirements-nodeps.txt`")
  path = os.path.join(list(spec.submodule_search_locations)[0], "model.py")
  module_spec = importlib.util.spec_from_file_location("_openai_clip_model_for_bench", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def normalize(images: torch.Tensor) -> torch.Tensor:
  """uint8 NHWC [B, H, W, 3] -> float32 NCHW normalised with CLIP's mean and std."""
  x = images.permute(0, 3, 1, 2).float().div_(255.0)
  mean = torch.tensor(_MEAN, device=images.device).view(1, 3, 1, 1)
  std = torch.tensor(_STD, device=images.device).view(1, 3, 1, 1)
  return (x - mean) / std


def _resize_pos(pos: torch.Tensor, grid: int, hw: tuple[int, int], mode: str) -> torch.Tensor:
  """CLIP positional embedding [1 + grid^2, C] -> [1 + h*w, C] (class slot kept, grid resized)."""
  if (grid, grid) == tuple(hw):
    return pos
  c = pos.shape[-1]
  g = pos[1:].reshape(1, grid, grid, c).permute(0, 3, 1, 2)
  g = F.interpolate(g, size=tuple(hw), mode=mode, align_corners=False)
  return torch.cat([pos[:1], g.permute(0, 2, 3, 1).reshape(-1, c)], dim=0)


class TorchEEES(nn.Module):
  """Two-stem CLIP ModifiedResNet + the f / v heads; images NCHW normalised, modality [B] long."""

  def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width: int = 64, output_dim: int = 1024,
               heads: int = 32, pos_grid: int = 7, last_stride: int = 1, num_classes: int = 395,
               gem_p: float = 3.0, interpolation: str = "bicubic"):
    super().__init__()
    clip = openai_clip_model()
    self.visual = clip.ModifiedResNet(tuple(layers), output_dim, heads,
                                      input_resolution=pos_grid * 32, width=width)
    if last_stride not in (1, 2):
      raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
    if last_stride == 1:  # CLIP's strides are average pools: drop layer4's, keep its weights
      block = self.visual.layer4[0]
      block.avgpool = nn.Identity()
      block.downsample._modules["-1"] = nn.Identity()  # pylint: disable=protected-access
      block.stride = 1
    # The infrared stem: a copy of the visible one (equal at initialisation, as in EEES).
    self.stem_ir = nn.ModuleDict({k: copy.deepcopy(getattr(self.visual, k)) for k in _STEM})
    self.pos_grid, self.interpolation = pos_grid, interpolation
    self.gem_p = nn.Parameter(torch.tensor(float(gem_p)))
    embed = 32 * width
    self.bnneck_f = nn.BatchNorm1d(embed)
    self.bnneck_v = nn.BatchNorm1d(output_dim)
    for bn in (self.bnneck_f, self.bnneck_v):
      bn.bias.requires_grad_(False)  # BNNeck bias frozen
    self.classifier_f = nn.Linear(embed, num_classes, bias=False)
    self.classifier_v = nn.Linear(output_dim, num_classes, bias=False)
    for c in (self.classifier_f, self.classifier_v):
      nn.init.normal_(c.weight, std=0.001)

  def _stem(self, x: torch.Tensor, modules) -> torch.Tensor:
    get = (lambda k: getattr(self.visual, k)) if modules is None else (lambda k: modules[k])
    for i in (1, 2, 3):
      x = F.relu(get(f"bn{i}")(get(f"conv{i}")(x)))
    return F.avg_pool2d(x, 2)

  def encode(self, x: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (layer4 map [B, 32*width, h, w], attention-pool output [B, output_dim])."""
    vis = torch.nonzero(modality == 0).flatten()
    ir = torch.nonzero(modality == 1).flatten()
    parts = []
    if len(vis):
      parts.append((vis, self._stem(x[vis], None)))
    if len(ir):
      parts.append((ir, self._stem(x[ir], self.stem_ir)))
    if len(parts) == 1 and len(parts[0][0]) == x.shape[0]:
      h = parts[0][1]
    else:
      first = parts[0][1]
      h = first.new_empty((x.shape[0],) + tuple(first.shape[1:]))
      for idx, part in parts:
        h = h.index_copy(0, idx, part)
    v = self.visual
    fmap = v.layer4(v.layer3(v.layer2(v.layer1(h))))
    ap = v.attnpool
    pos = _resize_pos(ap.positional_embedding, self.pos_grid, fmap.shape[-2:], self.interpolation)
    pooled = torch.func.functional_call(ap, {"positional_embedding": pos}, (fmap,))
    return fmap, pooled

  def forward(self, x: torch.Tensor, modality: torch.Tensor) -> dict[str, torch.Tensor]:
    fmap, pooled = self.encode(x, modality)
    p = self.gem_p
    f = fmap.float().clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
    v = pooled.float()
    f_bn, v_bn = self.bnneck_f(f), self.bnneck_v(v)
    return dict(f=f, v=v, f_bn=f_bn, v_bn=v_bn, logits_f=self.classifier_f(f_bn),
                logits_v=self.classifier_v(v_bn))

  def embed(self, x: torch.Tensor, modality: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Test-time feature [B, 2 * (Df + Dv)]: [l2(BN f), l2(v)] of the image and of its mirror."""
    def one(z):
      out = self(z, modality)
      return torch.cat([F.normalize(out["f_bn"].float(), dim=-1),
                        F.normalize(out["v"].float(), dim=-1)], dim=-1)
    feats = one(x)
    if flip:
      feats = torch.cat([feats, one(torch.flip(x, dims=(3,)))], dim=-1)
    return feats


def randomize_(model: TorchEEES, seed: int = 0) -> None:
  """Random weights that keep a deep net's activations in range, in place, all drawn from `seed`:
  the convolutions and linear layers get torch's initialisation (the classifiers AGW's N(0, 0.001));
  every BatchNorm gets a random scale 1 +- 0.1, shift, running mean and running variance (CLIP
  zero-initialises some scales, which would hide half the network from a comparison); the two
  stems differ."""
  torch.manual_seed(seed)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if module in (model.classifier_f, model.classifier_v):
        nn.init.normal_(module.weight, std=0.001)
      elif isinstance(module, (nn.Conv2d, nn.Linear)):
        module.reset_parameters()
      if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        c = module.num_features
        module.weight.copy_(1.0 + 0.1 * torch.randn(c, generator=gen))
        module.bias.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    ap = model.visual.attnpool
    ap.positional_embedding.copy_(torch.randn(ap.positional_embedding.shape, generator=gen)
                                  * ap.positional_embedding.shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------
# The train step: identity + WRT triplet, Adam.
# ---------------------------------------------------------------------------------------------

def wrt_triplet(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
  """AGW's weighted-regularisation triplet on Euclidean distances, the anchor not its own positive
  (as eees_jax.losses.wrt_triplet); every anchor of a P x K batch has positives and negatives."""
  x = x.float()
  sq = (x * x).sum(dim=1)
  d = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp(min=1e-12).sqrt()
  same = labels[:, None] == labels[None, :]
  pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
  neg = ~same
  w_pos = torch.softmax(d.masked_fill(~pos, float("-inf")), dim=1)
  w_neg = torch.softmax((-d).masked_fill(~neg, float("-inf")), dim=1)
  ap = (w_pos * d).sum(dim=1)
  an = (w_neg * d).sum(dim=1)
  return F.softplus(ap - an).mean()


def loss_fn(out: dict[str, torch.Tensor], labels: torch.Tensor, wrt_weight: float) -> torch.Tensor:
  """CE(logits_f) + CE(logits_v) + wrt_weight * (WRT(f) + WRT(v)), as eees_jax.losses.eees_loss
  with only its id and wrt terms on."""
  ce = F.cross_entropy(out["logits_f"].float(), labels) + F.cross_entropy(out["logits_v"].float(),
                                                                          labels)
  return ce + wrt_weight * (wrt_triplet(out["f"], labels) + wrt_triplet(out["v"], labels))


def make_optimizer(model: TorchEEES, lr: float, weight_decay: float,
                   classifier_mult: float = 2.0) -> torch.optim.Optimizer:
  """torch.optim.Adam with L2 weight decay; classifiers at classifier_mult x lr (the project's
  optim.groups); the frozen BNNeck biases are left out."""
  cls = [p for n, p in model.named_parameters() if n.startswith("classifier_")]
  rest = [p for n, p in model.named_parameters()
          if not n.startswith("classifier_") and p.requires_grad]
  return torch.optim.Adam([{"params": rest}, {"params": cls, "lr": lr * classifier_mult}], lr=lr,
                          weight_decay=weight_decay)


class TrainStep:
  """step(images uint8 NHWC, labels, modality) -> loss: one Adam step of the peer, in place.

  bf16=True runs the forward pass under autocast (bfloat16 matmuls and convolutions, float32
  parameters, optimiser and loss), PyTorch's mixed precision."""

  def __init__(self, model: TorchEEES, *, lr: float, weight_decay: float, wrt_weight: float,
               bf16: bool = False, autocast_device: str = "cpu"):
    self.model, self.wrt_weight, self.bf16 = model, wrt_weight, bf16
    self.device = autocast_device
    self.opt = make_optimizer(model, lr, weight_decay)

  def __call__(self, images: torch.Tensor, labels: torch.Tensor,
               modality: torch.Tensor) -> float:
    self.model.train()
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
      out = self.model(normalize(images), modality)
    loss = loss_fn(out, labels, self.wrt_weight)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# The same weights in the Flax model.
# ---------------------------------------------------------------------------------------------

def _clip_state_dict(model: TorchEEES, stem: str) -> dict[str, np.ndarray]:
  """An OpenAI CLIP state dict holding the peer's tower (with the visible or the infrared stem)
  and a one-layer text tower, which the converter requires and the benchmark does not use."""
  visual = {f"visual.{k}": v.detach().cpu().numpy() for k, v in model.visual.state_dict().items()}
  if stem == "infrared":
    for k, v in model.stem_ir.state_dict().items():
      visual[f"visual.{k}"] = v.detach().cpu().numpy()
  rng = np.random.default_rng(0)
  width, ctx, vocab = 64, 4, 8
  embed = model.visual.output_dim
  text = {"token_embedding.weight": (vocab, width), "positional_embedding": (ctx, width),
          "ln_final.weight": (width,), "ln_final.bias": (width,),
          "text_projection": (width, embed),
          "transformer.resblocks.0.attn.in_proj_weight": (3 * width, width),
          "transformer.resblocks.0.attn.in_proj_bias": (3 * width,),
          "transformer.resblocks.0.attn.out_proj.weight": (width, width),
          "transformer.resblocks.0.attn.out_proj.bias": (width,),
          "transformer.resblocks.0.ln_1.weight": (width,),
          "transformer.resblocks.0.ln_1.bias": (width,),
          "transformer.resblocks.0.ln_2.weight": (width,),
          "transformer.resblocks.0.ln_2.bias": (width,),
          "transformer.resblocks.0.mlp.c_fc.weight": (4 * width, width),
          "transformer.resblocks.0.mlp.c_fc.bias": (4 * width,),
          "transformer.resblocks.0.mlp.c_proj.weight": (width, 4 * width),
          "transformer.resblocks.0.mlp.c_proj.bias": (width,), "logit_scale": ()}
  out = {k: rng.standard_normal(s).astype(np.float32) for k, s in text.items()}
  out.update(visual)
  return out


def to_flax_variables(model: TorchEEES) -> tuple[dict, dict[str, Any]]:
  """The peer's weights as the Flax EEES module's variables.

  Returns (vision_config of the converted tower, {'params', 'batch_stats'} of eees_jax's EEES with
  the tower under 'encoder', stem index 0 visible and 1 infrared, and the heads).
  """
  from eees_jax import weights as weights_lib  # pylint: disable=g-import-not-at-top
  vis = weights_lib.convert_openai_state_dict(_clip_state_dict(model, "visible"), num_modalities=2)
  ir = weights_lib.convert_openai_state_dict(_clip_state_dict(model, "infrared"), num_modalities=2)
  join = lambda a, b: {k: join(a[k], b[k]) if isinstance(a[k], dict)
                       else np.stack([a[k][0], b[k][1]]) for k in a}
  params = dict(vis.vision_params, stem=join(vis.vision_params["stem"], ir.vision_params["stem"]))
  stats = dict(vis.vision_batch_stats,
               stem=join(vis.vision_batch_stats["stem"], ir.vision_batch_stats["stem"]))
  n = lambda t: t.detach().cpu().numpy()
  heads, head_stats = {"gem": {"p": n(model.gem_p)}}, {}
  for name in ("bnneck_f", "bnneck_v"):
    bn = getattr(model, name)
    heads[name] = {"scale": n(bn.weight), "bias": n(bn.bias)}
    head_stats[name] = {"mean": n(bn.running_mean), "var": n(bn.running_var)}
  for name in ("classifier_f", "classifier_v"):
    heads[name] = {"kernel": n(getattr(model, name).weight).T.copy()}
  cfg = dict(vis.vision_config)
  return cfg, {"params": {"encoder": params, **heads}, "batch_stats": {"encoder": stats,
                                                                      **head_stats}}
