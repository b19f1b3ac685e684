"""Every training objective of EEES (SPEC section 3) as pure, vectorised JAX functions.

All functions take a boolean `valid` mask [N] so that padded rows (a batch padded to a fixed
shape, or to a multiple of the device count) contribute nothing to the value or the gradient.
Each loss is defined and finite (never NaN, gradients included) on degenerate batches: an
identity with one view, a batch with one identity, an identity seen in one modality only, or no
valid row at all; a loss with no term to average over is 0.

Numerics: inputs are promoted to at least float32 (bf16 activations are upcast), and every Gram
matrix is computed at `Precision.HIGHEST`, because TPUs (bf16 passes) and recent GPUs (TF32) would
otherwise lose the precision that |a|^2 + |b|^2 - 2<a, b> and logits divided by tau = 0.02 need.

This module imports nothing from the project: only jax, jax.numpy and chex.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp

Array = jax.Array
PairFn = Callable[[Array, Array], Array]

_PRECISION = jax.lax.Precision.HIGHEST
# Squared norms / distances below this are treated as exactly zero (safe sqrt, safe l2).
_SQ_EPS = 1e-12
PAIR_KINDS = ("sum", "linear", "cross_attention")


# ----------------------------------------------------------------------------------------------
# Helpers.


def _as_float(x: Array) -> Array:
  """Promotes to at least float32 (keeps float64 when x64 is on)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _mask_rows(x: Array, valid: Array) -> Array:
  """Zeros the padded rows of x [N, ...] so garbage there cannot reach values or gradients."""
  return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x))


def _check_common(labels: Array, valid: Array, n: int) -> None:
  chex.assert_shape(labels, (n,))
  chex.assert_shape(valid, (n,))
  chex.assert_type(labels, int)
  chex.assert_type(valid, bool)


def l2_normalize(x: Array, axis: int = -1) -> Array:
  """x / ||x|| along `axis`; an all-zero vector maps to zero with a finite gradient.

  Uses rsqrt(max(|x|^2, eps)) rather than x / max(||x||, eps): the latter differentiates sqrt at 0
  (0 * inf = NaN) for a zero row.
  """
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _SQ_EPS * _SQ_EPS))


def _safe_sqrt(sq: Array) -> Array:
  """sqrt with value 0 and gradient 0 at (numerically) zero input; the double `where` keeps
  the derivative of sqrt at 0 (inf) out of the backward pass."""
  pos = sq > _SQ_EPS
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _pairwise_sq_dists(x: Array) -> Array:
  """Squared Euclidean distances [N, N] of x [N, D], clamped at 0, exactly 0 on the diagonal."""
  gram = jnp.matmul(x, x.T, precision=_PRECISION)
  norms = jnp.diagonal(gram)
  sq = jnp.maximum(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0)
  return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, sq)


def pairwise_distances(x: Array, distance: str = "euclidean") -> Array:
  """Distances [N, N] between the rows of x [N, D].

  "euclidean": ||x_i - x_j|| with a safe sqrt (finite gradient at d = 0).
  "cosine": 1 - <x^_i, x^_j> (x normalised inside).
  """
  if distance == "euclidean":
    return _safe_sqrt(_pairwise_sq_dists(x))
  if distance == "cosine":
    xn = l2_normalize(x)
    return 1.0 - jnp.matmul(xn, xn.T, precision=_PRECISION)
  raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")


def _masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """Mean of x over mask (0 where the mask is empty)."""
  total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
  count = jnp.sum(mask, axis=axis)
  return total / jnp.maximum(count, 1).astype(total.dtype)


def _masked_log_softmax(logits: Array, mask: Array, axis: int = -1) -> Array:
  """log-softmax of logits restricted to mask along axis; 0 outside the mask.

  A fully masked slice gives all zeros with zero gradient (no -inf - -inf, no log 0).
  """
  any_ = jnp.any(mask, axis=axis, keepdims=True)
  m = jnp.max(jnp.where(mask, logits, -jnp.inf), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(any_, m, 0.0))
  z = jnp.where(mask, logits - m, -jnp.inf)
  s = jnp.sum(jnp.exp(z), axis=axis, keepdims=True)
  lse = jnp.log(jnp.where(any_, s, 1.0))
  return jnp.where(mask, z - lse, 0.0)


def _masked_softmax(logits: Array, mask: Array, axis: int = -1) -> Array:
  return jnp.where(mask, jnp.exp(_masked_log_softmax(logits, mask, axis)), 0.0)


def _identity_slots(labels: Array, valid: Array) -> tuple[Array, Array, Array]:
  """Groups the valid rows by identity without assuming any batch structure.

  Slot c of N stands for the identity whose first valid occurrence in the batch is row c; slots
  that are not a first occurrence are unused. Permutation-equivariant and jit-friendly (no
  sorting, no sentinel label).

  Returns:
    slot_of_row: int [N], the slot of each row (meaningless for invalid rows).
    active: bool [N], the slot is used.
    member: bool [N slots, N rows], member[c, i] = row i belongs to slot c.
  """
  n = labels.shape[0]
  idx = jnp.arange(n)
  same = labels[:, None] == labels[None, :]
  first = jnp.min(jnp.where(same & valid[None, :], idx[None, :], n), axis=1)
  active = valid & (first == idx)
  member = active[:, None] & same & valid[None, :]
  return jnp.minimum(first, n - 1), active, member


# ----------------------------------------------------------------------------------------------
# 1. Identity loss.


def identity_loss(logits: Array, labels: Array, valid: Array,
                  label_smoothing: float = 0.0) -> Array:
  """Mean cross-entropy over the valid rows (SPEC 3.1, one classifier).

  Label smoothing spreads eps uniformly over all C classes, target (1 - eps) onehot + eps / C
  (as torch's `label_smoothing` and the CSDN/AGW CrossEntropyLabelSmooth).

  Args:
    logits: [N, C] classifier outputs.
    labels: int [N] class ids in [0, C) (padded rows may hold anything).
    valid: bool [N].
    label_smoothing: eps in [0, 1).
  Returns:
    scalar; 0 when no row is valid.
  """
  chex.assert_rank(logits, 2)
  _check_common(labels, valid, logits.shape[0])
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  logits = _mask_rows(_as_float(logits), valid)
  num_classes = logits.shape[1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  target = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes, dtype=logp.dtype)
  if label_smoothing:
    target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
  ce = -jnp.sum(target * logp, axis=-1)
  return _masked_mean(ce, valid)


# ----------------------------------------------------------------------------------------------
# 2. Weighted-regularisation triplet (AGW).


def wrt_triplet(features: Array, labels: Array, valid: Array,
                include_self_positive: bool = False) -> Array:
  """AGW weighted-regularisation triplet loss, Euclidean distances (SPEC 3.2).

  For anchor i with positives P(i) (same label, j != i) and negatives N(i):
    ap(i) = sum_{j in P} softmax_P(d_ij) d_ij,  an(i) = sum_{j in N} softmax_N(-d_ij) d_ij,
    L(i) = softplus(ap(i) - an(i)),
  averaged over the valid anchors with at least one positive and one negative (0 if none).

  Choices, compared with AGW's `TripletLoss_WRT` (Cross-Modal-Re-ID-baseline loss.py):
  - d is the plain (not squared) Euclidean distance, as AGW's pdist (sqrt of the clamped
    squared distance); here the sqrt is safe (value and gradient 0 at d = 0).
  - AGW's positive mask includes the anchor itself (d_ii ~ 0, which dilutes the positive
    weights). By default we exclude it, as the SPEC's P(i) with j != i;
    `include_self_positive=True` reproduces AGW.
  - The weights are an exact masked softmax (max subtraction over the masked entries only);
    AGW subtracts max(d * mask) and adds 1e-6 to the normaliser, which changes the value by
    O(1e-6). Gradients flow through the weights, as in AGW (no stop-gradient).
  - AGW averages over all anchors; we skip anchors without a positive or a negative, which is
    the same on AGW batches and well defined on degenerate ones.

  Args:
    features: [N, D].
    labels: int [N].
    valid: bool [N].
    include_self_positive: count j = i among the positives (AGW's exact form).
  Returns:
    scalar.
  """
  chex.assert_rank(features, 2)
  _check_common(labels, valid, features.shape[0])
  x = _mask_rows(_as_float(features), valid)
  n = x.shape[0]
  d = pairwise_distances(x, "euclidean")
  same = labels[:, None] == labels[None, :]
  both = valid[:, None] & valid[None, :]
  not_self = ~jnp.eye(n, dtype=bool)
  pos = same & both & not_self
  neg = ~same & both
  pos_w = pos | (jnp.eye(n, dtype=bool) & both) if include_self_positive else pos
  ap = jnp.sum(_masked_softmax(d, pos_w) * d, axis=1)
  an = jnp.sum(_masked_softmax(-d, neg) * d, axis=1)
  anchor = valid & jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
  return _masked_mean(jax.nn.softplus(ap - an), anchor)


# ----------------------------------------------------------------------------------------------
# 3. ESE: identity-aware image-text contrast.


def ese_loss(v: Array, t: Array, labels: Array, valid: Array, modality: Array | None = None,
             tau: float = 0.02, within_modality: bool = False) -> Array:
  """Explicit Semantics Embedding loss (SPEC 3.3).

  s_ij = <v^_i, t^_j> / tau over valid i, j; target q_ij = 1[y_i = y_j] / #{k : y_k = y_i}
  (counts over valid rows). L_i2t = mean_i CE(q_i, softmax_j s_ij), L_t2i the same on s^T
  (q is symmetric), L = (L_i2t + L_t2i) / 2. With `within_modality`, positives also need
  m_i = m_j (the text of row j has the modality of image j); the softmax still runs over all
  valid columns.

  Args:
    v: [N, Dj] image features in the joint space (normalised inside).
    t: [N, Dj] text embedding of each row's description (normalised inside).
    labels: int [N].
    valid: bool [N].
    modality: int [N]; required when within_modality.
    tau: temperature.
    within_modality: restrict positives to the same modality.
  Returns:
    scalar.
  """
  chex.assert_rank([v, t], 2)
  chex.assert_equal_shape([v, t])
  _check_common(labels, valid, v.shape[0])
  if tau <= 0:
    raise ValueError(f"ese tau must be > 0, got {tau}")
  vn = l2_normalize(_mask_rows(_as_float(v), valid))
  tn = l2_normalize(_mask_rows(_as_float(t), valid))
  s = jnp.matmul(vn, tn.T, precision=_PRECISION) / tau
  both = valid[:, None] & valid[None, :]
  pos = (labels[:, None] == labels[None, :]) & both
  if within_modality:
    if modality is None:
      raise ValueError("ese_loss(within_modality=True) needs the modality array")
    chex.assert_shape(modality, v.shape[:1])
    pos = pos & (modality[:, None] == modality[None, :])
  q = pos / jnp.maximum(jnp.sum(pos, axis=1, keepdims=True), 1).astype(s.dtype)
  i2t = -jnp.sum(q * _masked_log_softmax(s, both, axis=1), axis=1)
  t2i = -jnp.sum(q.T * _masked_log_softmax(s.T, both, axis=1), axis=1)
  return 0.5 * (_masked_mean(i2t, valid) + _masked_mean(t2i, valid))


# ----------------------------------------------------------------------------------------------
# 4. Pair representation g(a, b).


def init_pair_params(key: Array, kind: str, dim: int, num_heads: int = 1) -> dict[str, Array]:
  """Parameters of the pair representation g (SPEC 3.4), a plain dict of float32 arrays.

  "sum": {} (no parameters).
  "linear": {"kernel": [2D, D]}, LeCun-normal (fan_in 2D), no bias (SPEC: l2(W [a; b])).
  "cross_attention": a Flax-style multi-head attention block
    {"query_kernel", "key_kernel", "value_kernel": [D, H, D/H], "query_bias", "key_bias",
     "value_bias": [H, D/H], "out_kernel": [H, D/H, D], "out_bias": [D]},
    kernels LeCun-normal (as flax.linen.MultiHeadDotProductAttention), biases zero. The number
    of heads is read back from the kernel shapes, so `pair_representation` needs no argument.

  Args:
    key: PRNG key.
    kind: one of PAIR_KINDS.
    dim: D, the joint-space width of a and b.
    num_heads: H for "cross_attention"; must divide D.
  """
  if kind == "sum":
    return {}
  init = jax.nn.initializers.lecun_normal()
  if kind == "linear":
    return {"kernel": init(key, (2 * dim, dim), jnp.float32)}
  if kind == "cross_attention":
    if num_heads < 1 or dim % num_heads:
      raise ValueError(f"pair.num_heads={num_heads} must be >= 1 and divide the joint dim {dim}")
    hd = dim // num_heads
    kq, kk, kv, ko = jax.random.split(key, 4)
    proj = functools.partial(init, shape=(dim, num_heads, hd), dtype=jnp.float32)
    # Output projection: fan_in is H * hd = D, as DenseGeneral over the two head axes.
    out = init(ko, (dim, dim), jnp.float32).reshape(num_heads, hd, dim)
    zeros = jnp.zeros((num_heads, hd), jnp.float32)
    return {"query_kernel": proj(kq), "key_kernel": proj(kk), "value_kernel": proj(kv),
            "query_bias": zeros, "key_bias": zeros, "value_bias": zeros,
            "out_kernel": out, "out_bias": jnp.zeros((dim,), jnp.float32)}
  raise ValueError(f"pair kind must be one of {PAIR_KINDS}, got {kind!r}")


def pair_representation(kind: str, params: Mapping[str, Array] | None, a: Array,
                        b: Array) -> Array:
  """Pair representation z = g(a, b) of an image feature a and a text feature b (SPEC 3.4).

  "sum": l2(a + b).
  "linear": l2([a; b] W).
  "cross_attention": one cross-attention block in which the image queries the text. For vector
    inputs the key/value sequence is the two tokens [a, b] (the image may keep attending to
    itself, so the block can ignore a misleading description); the query is a:
      q = a Wq + bq, k_s = x_s Wk + bk, v_s = x_s Wv + bv for x_s in {a, b}, per head h:
      alpha_s = softmax_s(<q_h, k_{s,h}> / sqrt(D/H)), o = sum_h (sum_s alpha_s v_{s,h}) Wo_h + bo,
      z = l2(a + o)   (residual from the query, then l2).

  Args:
    kind: one of PAIR_KINDS.
    params: from init_pair_params (ignored for "sum").
    a: [..., D] image features (normally already l2-normalised).
    b: [..., D] text features, same shape.
  Returns:
    [..., D], unit norm.
  """
  chex.assert_equal_shape([a, b])
  a = _as_float(a)
  b = _as_float(b)
  if kind == "sum":
    return l2_normalize(a + b)
  if params is None:
    raise ValueError(f"pair kind {kind!r} needs parameters; pass init_pair_params(...) output")
  if kind == "linear":
    kernel = params["kernel"]
    chex.assert_shape(kernel, (2 * a.shape[-1], a.shape[-1]))
    ab = jnp.concatenate([a, b], axis=-1)
    return l2_normalize(jnp.matmul(ab, kernel.astype(a.dtype), precision=_PRECISION))
  if kind == "cross_attention":
    d = a.shape[-1]
    wq = params["query_kernel"]
    chex.assert_rank(wq, 3)
    chex.assert_equal(wq.shape[0], d)
    hd = wq.shape[2]
    ein = functools.partial(jnp.einsum, precision=_PRECISION)
    tokens = jnp.stack([a, b], axis=-2)  # [..., 2, D]
    q = ein("...d,dhk->...hk", a, wq) + params["query_bias"]
    k = ein("...sd,dhk->...shk", tokens, params["key_kernel"]) + params["key_bias"]
    v = ein("...sd,dhk->...shk", tokens, params["value_kernel"]) + params["value_bias"]
    logits = ein("...hk,...shk->...hs", q, k) / math.sqrt(hd)
    attn = jax.nn.softmax(logits, axis=-1)
    heads = ein("...hs,...shk->...hk", attn, v)
    o = ein("...hk,hkd->...d", heads, params["out_kernel"]) + params["out_bias"]
    return l2_normalize(a + o)
  raise ValueError(f"pair kind must be one of {PAIR_KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# 5. CVSC: cross-view semantics compensation.


def cvsc_loss(v: Array, t: Array, labels: Array, valid: Array, pair_fn: PairFn,
              tau: float = 0.02, kd_temperature: float = 4.0) -> tuple[Array, dict[str, Array]]:
  """Cross-View Semantics Compensation (SPEC 3.5): many-to-many matching + distillation.

  For every identity c present among the valid rows (all of its views, any modality):
    Vbar_c = l2(mean_i v^_i), Tbar_c = l2(mean_i t^_i), Zbar_c = pair_fn(Vbar_c, Tbar_c).
  L_m2m = (CE_rows + CE_cols) / 2 over S_cd = <Vbar_c, Tbar_d> / tau, diagonal targets, each CE
  averaged over the identities present.
  L_kd = T^2 mean_i KL(p^T_{y_i} || p^S_i), p^T_c = softmax_d(<Zbar_c, Tbar_d> / T) held constant
  (stop-gradient: no gradient reaches Zbar, pair_fn's parameters or the teacher's Tbar),
  p^S_i = softmax_d(<v^_i, Tbar_d> / T) over the identities present.
  Identities are found from the labels alone (no P x K layout assumed); unused slots are
  masked out of every softmax and mean. One identity: both terms are 0.

  Args:
    v: [N, Dj] image joint-space features (normalised inside).
    t: [N, Dj] text embeddings (normalised inside).
    labels: int [N].
    valid: bool [N].
    pair_fn: (a [M, Dj], b [M, Dj]) -> [M, Dj], e.g.
      functools.partial(pair_representation, kind, params).
    tau: temperature of S.
    kd_temperature: T.
  Returns:
    (L_m2m + L_kd, {"m2m": L_m2m, "kd": L_kd, "num_identities": float count}).
  """
  chex.assert_rank([v, t], 2)
  chex.assert_equal_shape([v, t])
  _check_common(labels, valid, v.shape[0])
  if tau <= 0 or kd_temperature <= 0:
    raise ValueError(f"cvsc tau and kd_temperature must be > 0, got {tau}, {kd_temperature}")
  vn = l2_normalize(_mask_rows(_as_float(v), valid))
  tn = l2_normalize(_mask_rows(_as_float(t), valid))
  slot_of_row, active, member = _identity_slots(labels, valid)
  mf = member.astype(vn.dtype)
  vbar = l2_normalize(jnp.matmul(mf, vn, precision=_PRECISION))  # [N slots, Dj]; 0 if unused
  tbar = l2_normalize(jnp.matmul(mf, tn, precision=_PRECISION))
  pair_mask = active[:, None] & active[None, :]

  s = jnp.matmul(vbar, tbar.T, precision=_PRECISION) / tau
  ce_rows = -jnp.diagonal(_masked_log_softmax(s, pair_mask, axis=1))
  ce_cols = -jnp.diagonal(_masked_log_softmax(s, pair_mask, axis=0))
  m2m = 0.5 * (_masked_mean(ce_rows, active) + _masked_mean(ce_cols, active))

  temp = kd_temperature
  zbar = pair_fn(vbar, tbar)
  chex.assert_equal_shape([zbar, vbar])
  teacher_logits = jnp.matmul(zbar, tbar.T, precision=_PRECISION) / temp
  log_pt = jax.lax.stop_gradient(_masked_log_softmax(teacher_logits, pair_mask, axis=1))
  student_mask = valid[:, None] & active[None, :]
  log_ps = _masked_log_softmax(jnp.matmul(vn, tbar.T, precision=_PRECISION) / temp,
                               student_mask, axis=1)
  log_pt_rows = log_pt[slot_of_row]  # teacher of each row's identity, [N, N slots]
  kl = jnp.sum(jnp.where(student_mask, jnp.exp(log_pt_rows) * (log_pt_rows - log_ps), 0.0),
               axis=1)
  kd = temp * temp * _masked_mean(kl, valid)
  aux = {"m2m": m2m, "kd": kd, "num_identities": jnp.sum(active).astype(m2m.dtype)}
  return m2m + kd, aux


# ----------------------------------------------------------------------------------------------
# 6./7. CMSP and the CSDN distance-consistency loss.


def _intra_inter(x: Array, labels: Array, modality: Array, valid: Array, intra: str,
                 distance: str, k: int | None) -> tuple[Array, Array, Array]:
  """Per-anchor mean intra-/inter-modality same-identity distances and the anchor mask.

  Returns (d_inter [N], d_intra [N], anchor bool [N]); anchor = valid row with at least one
  intra- and one inter-modality same-identity partner.
  """
  n = x.shape[0]
  d = pairwise_distances(x, distance)
  both = valid[:, None] & valid[None, :]
  same = (labels[:, None] == labels[None, :]) & both
  same_mod = modality[:, None] == modality[None, :]
  intra_mask = same & same_mod & ~jnp.eye(n, dtype=bool)
  inter_mask = same & ~same_mod
  d_inter = _masked_mean(d, inter_mask, axis=1)
  if intra == "mean":
    d_intra = _masked_mean(d, intra_mask, axis=1)
  elif intra == "hardest":
    if k is None or int(k) < 1:
      raise ValueError(f"intra='hardest' needs an integer k >= 1 (the K - 1 of CSDN), got {k}")
    kk = min(int(k), n)
    top, _ = jax.lax.top_k(jnp.where(intra_mask, d, -jnp.inf), kk)  # [N, kk], largest first
    d_intra = _masked_mean(top, jnp.isfinite(top), axis=1)
  else:
    raise ValueError(f"intra must be 'mean' or 'hardest', got {intra!r}")
  anchor = valid & jnp.any(intra_mask, axis=1) & jnp.any(inter_mask, axis=1)
  return d_inter, d_intra, anchor


def cmsp_loss(z: Array, labels: Array, modality: Array, valid: Array, intra: str = "mean",
              distance: str = "euclidean", k: int | None = None) -> Array:
  """Cross-Modality Semantics Purification (SPEC 3.6) on pair representations z.

  d_intra(i) = mean_{j != i, y_j = y_i, m_j = m_i} d_ij,
  d_inter(i) = mean_{y_j = y_i, m_j != m_i} d_ij,
  L = mean_i (d_inter(i) - d_intra(i))^2 over the valid anchors that have both (an identity
  present in one modality only contributes nothing; 0 if no anchor qualifies).

  Options:
  - intra="hardest": d_intra(i) is the mean of the k largest intra distances (all of them if
    fewer exist), as CSDN's tools/MSEL.py, which takes topk(num_pos - 1) of the same-identity
    same-modality distances, i.e. k = K - 1. In CSDN's two-view layout that is every intra
    partner; in the V/Vc/R layout a visible anchor has 2K - 1 intra partners, of which the
    K - 1 farthest are kept.
  - distance="cosine": 1 - cos(z_i, z_j) (CSDN's MSEL_Cos); default Euclidean with a safe sqrt.

  Args:
    z: [N, D] pair representations (or any features).
    labels, modality: int [N].
    valid: bool [N].
    intra: "mean" | "hardest".
    distance: "euclidean" | "cosine".
    k: number of hardest intra distances (static int), used by intra="hardest".
  Returns:
    scalar.
  """
  chex.assert_rank(z, 2)
  _check_common(labels, valid, z.shape[0])
  chex.assert_shape(modality, (z.shape[0],))
  chex.assert_type(modality, int)
  x = _mask_rows(_as_float(z), valid)
  d_inter, d_intra, anchor = _intra_inter(x, labels, modality, valid, intra, distance, k)
  return _masked_mean((d_inter - d_intra) ** 2, anchor)


def distance_consistency_loss(features: Array, labels: Array, modality: Array, valid: Array,
                              k: int | None = None, distance: str = "euclidean",
                              normalize: bool = False, num_modalities: int = 2) -> Array:
  """CSDN's distance-consistency loss (`MSEL`, tools/MSEL.py of the CSDN code) on image features.

  Per anchor: d_inter = mean distance to the same identity in the other modality, d_intra = mean
  of the k largest distances to the same identity in the same modality (k = K - 1 in CSDN;
  k=None uses all intra partners). CSDN averages (d_inter - d_intra)^2 within each modality and
  then over the two modalities, (L_visible + L_infrared) / 2; we do the same over the
  modalities that have at least one qualifying anchor. It differs from `cmsp_loss` only in this
  per-modality averaging and in acting on image features rather than pair representations.

  Args:
    features: [N, D] image features (f or v).
    labels, modality: int [N]; modality in [0, num_modalities).
    valid: bool [N].
    k: hardest-k intra (static int) or None for the mean.
    distance: "euclidean" (MSEL) | "cosine" (MSEL_Cos).
    normalize: l2-normalise the features first (MSEL's feat_norm='yes').
    num_modalities: number of modality values.
  Returns:
    scalar.
  """
  chex.assert_rank(features, 2)
  _check_common(labels, valid, features.shape[0])
  chex.assert_shape(modality, (features.shape[0],))
  chex.assert_type(modality, int)
  x = _mask_rows(_as_float(features), valid)
  if normalize:
    x = l2_normalize(x)
  intra = "mean" if k is None else "hardest"
  d_inter, d_intra, anchor = _intra_inter(x, labels, modality, valid, intra, distance, k)
  per_anchor = (d_inter - d_intra) ** 2
  groups = (modality[None, :] == jnp.arange(num_modalities)[:, None]) & anchor[None, :]
  per_modality = _masked_mean(per_anchor[None, :], groups, axis=1)  # [M]
  return _masked_mean(per_modality, jnp.any(groups, axis=1))


# ----------------------------------------------------------------------------------------------
# 8. The EEES objective.


def _section(cfg: Any, name: str) -> Any:
  try:
    return cfg[name]
  except (KeyError, TypeError, AttributeError):
    raise ValueError(f"loss config has no section '{name}'; every loss section needs at least "
                     "'enabled' (see eees_jax.losses.eees_loss for the fields)") from None


def _field(section: Any, section_name: str, name: str) -> Any:
  try:
    return section[name]
  except (KeyError, TypeError, AttributeError):
    raise ValueError(f"loss config field '{section_name}.{name}' is missing; add it to the "
                     "config (fields listed in eees_jax.losses.eees_loss)") from None


def eees_loss(outputs: Mapping[str, Array], text: Array, labels: Array, modality: Array,
              valid: Array, cfg: Any,
              pair_params: Mapping[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
  """The EEES training objective (SPEC 3.7): weighted sum of the enabled terms.

  Args:
    outputs: {"f": [N, Df] pre-BN GeM feature, "v": [N, Dj] pre-BN joint-space feature
      (unnormalised), "logits_f": [N, C], "logits_v": [N, C]}.
    text: [N, Dj] description embedding of each row (unnormalised).
    labels: int [N]; modality: int [N] (V and Vc = 0, infrared = 1); valid: bool [N].
    cfg: mapping (ml_collections.ConfigDict or nested dict). Sections and fields (all read with
      [] and required; the fields after `weight` only when the section is enabled):
        id:   enabled, weight, label_smoothing        CE on logits_f + CE on logits_v
        wrt:  enabled, weight                          WRT on f + WRT on v
        ese:  enabled, weight, tau, within_modality    ESE(v, text)
        pair: kind ("sum"|"linear"|"cross_attention")  read when cvsc or cmsp is enabled;
              (num_heads is used by init_pair_params, not here)
        cvsc: enabled, weight, tau, kd_temperature     CVSC(v, text, g)
        cmsp: enabled, weight, intra ("mean"|"hardest"), distance ("euclidean"|"cosine"),
              hardest_k (int, or None with intra="mean")   CMSP on z_i = g(v^_i, t^_i)
        dc:   enabled, weight, hardest_k (int or None = mean), distance
              CSDN distance consistency on f + on v
      Python-level switches: a disabled term is not computed and has no metric.
    pair_params: params["pair"] of the train state (init_pair_params); None/{} for kind "sum".
  Returns:
    (total, metrics): metrics hold each enabled term's unweighted value ("loss/id",
    "loss/id_f", "loss/id_v", "loss/wrt", "loss/wrt_f", "loss/wrt_v", "loss/ese", "loss/cvsc",
    "loss/cvsc_m2m", "loss/cvsc_kd", "loss/cmsp", "loss/dc") and "loss/total".
  """
  f, v = outputs["f"], outputs["v"]
  chex.assert_rank([f, v, text], 2)
  chex.assert_equal_shape([v, text])
  chex.assert_equal_shape_prefix([f, v, outputs["logits_f"], outputs["logits_v"]], 1)
  _check_common(labels, valid, v.shape[0])
  chex.assert_shape(modality, labels.shape)

  metrics: dict[str, Array] = {}
  total = jnp.zeros((), jnp.float32)

  def add(name: str, weight: float, value: Array) -> None:
    nonlocal total
    metrics[f"loss/{name}"] = value
    total = total + weight * value

  sec = _section(cfg, "id")
  if _field(sec, "id", "enabled"):
    ls = _field(sec, "id", "label_smoothing")
    id_f = identity_loss(outputs["logits_f"], labels, valid, ls)
    id_v = identity_loss(outputs["logits_v"], labels, valid, ls)
    metrics["loss/id_f"], metrics["loss/id_v"] = id_f, id_v
    add("id", _field(sec, "id", "weight"), id_f + id_v)

  sec = _section(cfg, "wrt")
  if _field(sec, "wrt", "enabled"):
    wrt_f = wrt_triplet(f, labels, valid)
    wrt_v = wrt_triplet(v, labels, valid)
    metrics["loss/wrt_f"], metrics["loss/wrt_v"] = wrt_f, wrt_v
    add("wrt", _field(sec, "wrt", "weight"), wrt_f + wrt_v)

  sec = _section(cfg, "ese")
  if _field(sec, "ese", "enabled"):
    value = ese_loss(v, text, labels, valid, modality, tau=_field(sec, "ese", "tau"),
                     within_modality=bool(_field(sec, "ese", "within_modality")))
    add("ese", _field(sec, "ese", "weight"), value)

  cvsc_sec, cmsp_sec = _section(cfg, "cvsc"), _section(cfg, "cmsp")
  cvsc_on, cmsp_on = _field(cvsc_sec, "cvsc", "enabled"), _field(cmsp_sec, "cmsp", "enabled")
  if cvsc_on or cmsp_on:
    kind = _field(_section(cfg, "pair"), "pair", "kind")
    if kind != "sum" and not pair_params:
      raise ValueError(f"pair.kind={kind!r} needs pair_params (params['pair'] from "
                       "init_pair_params); got none")
    pair_fn = functools.partial(pair_representation, kind, pair_params)
    if cvsc_on:
      value, aux = cvsc_loss(v, text, labels, valid, pair_fn, tau=_field(cvsc_sec, "cvsc", "tau"),
                             kd_temperature=_field(cvsc_sec, "cvsc", "kd_temperature"))
      metrics["loss/cvsc_m2m"], metrics["loss/cvsc_kd"] = aux["m2m"], aux["kd"]
      add("cvsc", _field(cvsc_sec, "cvsc", "weight"), value)
    if cmsp_on:
      vn = l2_normalize(_mask_rows(_as_float(v), valid))
      tn = l2_normalize(_mask_rows(_as_float(text), valid))
      z = pair_fn(vn, tn)
      value = cmsp_loss(z, labels, modality, valid, intra=_field(cmsp_sec, "cmsp", "intra"),
                        distance=_field(cmsp_sec, "cmsp", "distance"),
                        k=_field(cmsp_sec, "cmsp", "hardest_k"))
      add("cmsp", _field(cmsp_sec, "cmsp", "weight"), value)

  sec = _section(cfg, "dc")
  if _field(sec, "dc", "enabled"):
    k = _field(sec, "dc", "hardest_k")
    dist = _field(sec, "dc", "distance")
    value = (distance_consistency_loss(f, labels, modality, valid, k=k, distance=dist)
             + distance_consistency_loss(v, labels, modality, valid, k=k, distance=dist))
    add("dc", _field(sec, "dc", "weight"), value)

  metrics["loss/total"] = total
  return total, metrics
