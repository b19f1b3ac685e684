"""eees_jax.losses against plain NumPy loop oracles written from SPEC section 3 (float64).

Batches follow the training layout [V (PK), Vc (PK), R (PK)] with modality (0, 0, 1), V and Vc
sharing descriptions, plus a shuffled layout; padded rows carry garbage and must change nothing.
"""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from eees_jax import losses

D_F, D_J, NUM_CLASSES = 12, 8, 11
# (P, K, shuffled). Every batch is padded with garbage rows to N_PAD rows, so one compilation
# serves all cases and every oracle comparison also checks that padding changes nothing.
CASES = ((2, 1, True), (3, 2, False), (4, 3, True))
N_PAD = 40
RTOL, ATOL = 2e-4, 2e-5


# ---------------------------------------------------------------------------------------------
# Batches.


def make_batch(p, k, shuffle, seed, n_pad=None, d_f=D_F, d_j=D_J):
  """A [V, Vc, R] batch of P identities x K views; Vc shares V's text; n_pad garbage rows."""
  rng = np.random.default_rng(seed)
  ids = rng.choice(NUM_CLASSES, size=p, replace=False)
  per = np.repeat(ids, k)
  labels = np.concatenate([per, per, per]).astype(np.int32)
  modality = np.array([0] * (2 * p * k) + [1] * (p * k), np.int32)
  n = labels.size
  centre_v = rng.normal(size=(NUM_CLASSES, d_j))
  f = rng.normal(size=(n, d_f)) * 2.0
  v = centre_v[labels] * 0.7 + rng.normal(size=(n, d_j))
  t_vis = rng.normal(size=(p * k, d_j)) + centre_v[per]
  t = np.concatenate([t_vis, t_vis, rng.normal(size=(p * k, d_j)) + centre_v[per]])
  logits = rng.normal(size=(n, NUM_CLASSES)) * 2.0
  valid = np.ones(n, bool)
  n_pad = N_PAD - n if n_pad is None else n_pad
  if n_pad:  # garbage rows, labels both colliding with real identities and new
    labels = np.concatenate([labels, rng.choice(NUM_CLASSES, size=n_pad)]).astype(np.int32)
    modality = np.concatenate([modality, rng.integers(0, 2, n_pad)]).astype(np.int32)
    f = np.concatenate([f, rng.normal(size=(n_pad, d_f)) * 50])
    v = np.concatenate([v, rng.normal(size=(n_pad, d_j)) * 50])
    t = np.concatenate([t, rng.normal(size=(n_pad, d_j)) * 50])
    logits = np.concatenate([logits, rng.normal(size=(n_pad, NUM_CLASSES)) * 50])
    valid = np.concatenate([valid, np.zeros(n_pad, bool)])
  if shuffle:  # padded rows end up interleaved
    perm = rng.permutation(labels.size)
    labels, modality, valid, f, v, t, logits = (
        a[perm] for a in (labels, modality, valid, f, v, t, logits))
  f32 = lambda a: a.astype(np.float32)
  return dict(labels=labels, modality=modality, valid=valid, f=f32(f), v=f32(v), t=f32(t),
              logits=f32(logits))


def permute(batch, seed):
  perm = np.random.default_rng(seed).permutation(batch["labels"].size)
  return {key: val[perm] for key, val in batch.items()}


# ---------------------------------------------------------------------------------------------
# NumPy oracles (loops, float64, straight from the SPEC formulas).


def np_l2(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max()
  return x - m - np.log(np.sum(np.exp(x - m)))


def np_dist(a, b, distance="euclidean"):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if distance == "euclidean":
    return float(np.sqrt(np.sum((a - b) ** 2)))
  return float(1.0 - np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def oracle_ce(logits, labels, valid, eps=0.0):
  vals = []
  for i in np.flatnonzero(valid):
    logp = np_log_softmax(logits[i])
    c = logits.shape[1]
    target = np.full(c, eps / c)
    target[labels[i]] += 1.0 - eps
    vals.append(-np.sum(target * logp))
  return float(np.mean(vals)) if vals else 0.0


def oracle_wrt(x, labels, valid, include_self=False):
  x = np.asarray(x, np.float64)
  vals = []
  idx = np.flatnonzero(valid)
  for i in idx:
    pos = [j for j in idx if labels[j] == labels[i] and j != i]
    neg = [j for j in idx if labels[j] != labels[i]]
    if not pos or not neg:
      continue
    pos_w = pos + [i] if include_self else pos
    dp = np.array([np_dist(x[i], x[j]) for j in pos_w])
    dn = np.array([np_dist(x[i], x[j]) for j in neg])
    ap = np.sum(np.exp(dp) / np.sum(np.exp(dp)) * dp)
    an = np.sum(np.exp(-dn) / np.sum(np.exp(-dn)) * dn)
    vals.append(np.log1p(np.exp(ap - an)))
  return float(np.mean(vals)) if vals else 0.0


def oracle_ese(v, t, labels, valid, modality=None, tau=0.02, within=False):
  vn, tn = np_l2(v), np_l2(t)
  idx = np.flatnonzero(valid)
  if not idx.size:
    return 0.0

  def positive(i, j):
    return labels[i] == labels[j] and (not within or modality[i] == modality[j])

  i2t, t2i = [], []
  for i in idx:
    logp = np_log_softmax([vn[i] @ tn[j] / tau for j in idx])
    q = np.array([positive(i, j) for j in idx], np.float64)
    i2t.append(-np.sum(q / q.sum() * logp))
  for j in idx:  # text j against all images
    logp = np_log_softmax([vn[i] @ tn[j] / tau for i in idx])
    q = np.array([positive(j, i) for i in idx], np.float64)
    t2i.append(-np.sum(q / q.sum() * logp))
  return 0.5 * (np.mean(i2t) + np.mean(t2i))


def oracle_pair(kind, params, a, b):
  """g(a, b) for one pair of vectors."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if kind == "sum":
    return np_l2(a + b)
  params = {key: np.asarray(val, np.float64) for key, val in params.items()}
  if kind == "linear":
    return np_l2(np.concatenate([a, b]) @ params["kernel"])
  num_heads, hd = params["query_bias"].shape
  out = params["out_bias"].copy()
  tokens = [a, b]
  for h in range(num_heads):
    q = a @ params["query_kernel"][:, h, :] + params["query_bias"][h]
    ks = [x @ params["key_kernel"][:, h, :] + params["key_bias"][h] for x in tokens]
    vs = [x @ params["value_kernel"][:, h, :] + params["value_bias"][h] for x in tokens]
    scores = np.array([q @ kk / math.sqrt(hd) for kk in ks])
    alpha = np.exp(scores - scores.max())
    alpha /= alpha.sum()
    head = alpha[0] * vs[0] + alpha[1] * vs[1]
    out = out + head @ params["out_kernel"][h]
  return np_l2(a + out)


def oracle_cvsc(v, t, labels, valid, g, tau=0.02, temp=4.0):
  """Returns (total, m2m, kd); g maps one (a, b) pair of vectors to a vector."""
  vn, tn = np_l2(v), np_l2(t)
  idx = np.flatnonzero(valid)
  ids = sorted(set(labels[idx].tolist()))
  if not ids:
    return 0.0, 0.0, 0.0
  vbar = np.stack([np_l2(np.mean([vn[i] for i in idx if labels[i] == c], axis=0)) for c in ids])
  tbar = np.stack([np_l2(np.mean([tn[i] for i in idx if labels[i] == c], axis=0)) for c in ids])
  s = vbar @ tbar.T / tau
  rows = [-np_log_softmax(s[c])[c] for c in range(len(ids))]
  cols = [-np_log_softmax(s[:, c])[c] for c in range(len(ids))]
  m2m = 0.5 * (np.mean(rows) + np.mean(cols))
  zbar = np.stack([g(vbar[c], tbar[c]) for c in range(len(ids))])
  kls = []
  for i in idx:
    c = ids.index(labels[i])
    log_pt = np_log_softmax(zbar[c] @ tbar.T / temp)
    log_ps = np_log_softmax(vn[i] @ tbar.T / temp)
    kls.append(np.sum(np.exp(log_pt) * (log_pt - log_ps)))
  kd = temp * temp * np.mean(kls)
  return m2m + kd, m2m, kd


def _anchor_terms(x, labels, modality, valid, distance, k):
  """{anchor i: (d_inter, d_intra)} for anchors having both kinds of partner."""
  idx = np.flatnonzero(valid)
  out = {}
  for i in idx:
    intra = [np_dist(x[i], x[j], distance) for j in idx
             if j != i and labels[j] == labels[i] and modality[j] == modality[i]]
    inter = [np_dist(x[i], x[j], distance) for j in idx
             if labels[j] == labels[i] and modality[j] != modality[i]]
    if not intra or not inter:
      continue
    if k is not None:
      intra = sorted(intra, reverse=True)[:k]
    out[i] = (np.mean(inter), np.mean(intra))
  return out


def oracle_cmsp(z, labels, modality, valid, intra="mean", distance="euclidean", k=None):
  terms = _anchor_terms(z, labels, modality, valid, distance, k if intra == "hardest" else None)
  return float(np.mean([(a - b) ** 2 for a, b in terms.values()])) if terms else 0.0


def oracle_dc(x, labels, modality, valid, k=None, distance="euclidean"):
  terms = _anchor_terms(x, labels, modality, valid, distance, k)
  per_mod = []
  for m in (0, 1):
    vals = [(a - b) ** 2 for i, (a, b) in terms.items() if modality[i] == m]
    if vals:
      per_mod.append(np.mean(vals))
  return float(np.mean(per_mod)) if per_mod else 0.0


def full_config(kind="sum", **overrides):
  cfg = {
      "id": {"enabled": True, "weight": 1.0, "label_smoothing": 0.1},
      "wrt": {"enabled": True, "weight": 0.15},
      "ese": {"enabled": True, "weight": 0.7, "tau": 0.05, "within_modality": False},
      "pair": {"kind": kind, "num_heads": 2},
      "cvsc": {"enabled": True, "weight": 0.9, "tau": 0.05, "kd_temperature": 4.0},
      "cmsp": {"enabled": True, "weight": 1.3, "intra": "hardest", "distance": "euclidean",
               "hardest_k": 2},
      "dc": {"enabled": True, "weight": 0.4, "hardest_k": None, "distance": "euclidean"},
  }
  for name, fields in overrides.items():
    cfg[name] = {**cfg[name], **fields}
  return cfg


def oracle_eees(b, cfg, pair_params):
  """Dict of oracle term values for the enabled sections."""
  lab, mod, val = b["labels"], b["modality"], b["valid"]
  out = {}
  if cfg["id"]["enabled"]:
    ls = cfg["id"]["label_smoothing"]
    out["loss/id"] = (oracle_ce(b["logits"], lab, val, ls)  # logits_f, then logits_v
                      + oracle_ce(b["logits"][:, ::-1], lab, val, ls))
  if cfg["wrt"]["enabled"]:
    out["loss/wrt"] = oracle_wrt(b["f"], lab, val) + oracle_wrt(b["v"], lab, val)
  if cfg["ese"]["enabled"]:
    out["loss/ese"] = oracle_ese(b["v"], b["t"], lab, val, mod, cfg["ese"]["tau"],
                                 cfg["ese"]["within_modality"])
  g = functools.partial(oracle_pair, cfg["pair"]["kind"], pair_params)
  if cfg["cvsc"]["enabled"]:
    out["loss/cvsc"] = oracle_cvsc(b["v"], b["t"], lab, val, g, cfg["cvsc"]["tau"],
                                   cfg["cvsc"]["kd_temperature"])[0]
  if cfg["cmsp"]["enabled"]:
    z = np.zeros_like(b["v"], dtype=np.float64)
    for i in np.flatnonzero(val):
      z[i] = g(np_l2(b["v"][i]), np_l2(b["t"][i]))
    c = cfg["cmsp"]
    out["loss/cmsp"] = oracle_cmsp(z, lab, mod, val, c["intra"], c["distance"], c["hardest_k"])
  if cfg["dc"]["enabled"]:
    c = cfg["dc"]
    out["loss/dc"] = (oracle_dc(b["f"], lab, mod, val, c["hardest_k"], c["distance"])
                      + oracle_dc(b["v"], lab, mod, val, c["hardest_k"], c["distance"]))
  return out


def outputs_of(b):
  """Model outputs of a batch; logits_v differ from logits_f (columns reversed)."""
  return {"f": jnp.asarray(b["f"]), "v": jnp.asarray(b["v"]),
          "logits_f": jnp.asarray(b["logits"]), "logits_v": jnp.asarray(b["logits"][:, ::-1])}


def pair_params_for(kind, dim=D_J, seed=0):
  return losses.init_pair_params(jax.random.key(seed), kind, dim, num_heads=2)


# ---------------------------------------------------------------------------------------------
# Every loss against its oracle, jit and no-jit, on all CASES (padded to one shape).


def case_batches(seed):
  return [make_batch(p, k, shuffle, seed=seed + 10 * c) for c, (p, k, shuffle) in enumerate(CASES)]


class OracleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_identity(self):
    fn = self.variant(losses.identity_loss, static_argnums=3)
    for b in case_batches(1):
      for eps in (0.0, 0.2):
        got = fn(b["logits"], b["labels"], b["valid"], eps)
        want = oracle_ce(b["logits"], b["labels"], b["valid"], eps)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_wrt(self):
    fn = self.variant(losses.wrt_triplet, static_argnums=3)
    for b in case_batches(2):
      for include_self in (False, True):
        got = fn(b["f"], b["labels"], b["valid"], include_self)
        want = oracle_wrt(b["f"], b["labels"], b["valid"], include_self)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ese(self):
    fn = self.variant(losses.ese_loss, static_argnums=(5, 6))
    for b in case_batches(3):
      for within in (False, True):
        got = fn(b["v"], b["t"], b["labels"], b["valid"], b["modality"], 0.05, within)
        want = oracle_ese(b["v"], b["t"], b["labels"], b["valid"], b["modality"], 0.05, within)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cvsc(self):
    for kind in losses.PAIR_KINDS:
      params = pair_params_for(kind)

      def cvsc(v, t, labels, valid, params, kind=kind):
        pair_fn = functools.partial(losses.pair_representation, kind, params)
        return losses.cvsc_loss(v, t, labels, valid, pair_fn, tau=0.05, kd_temperature=3.0)

      fn = self.variant(cvsc)
      g = functools.partial(oracle_pair, kind, params)
      for (p, _, _), b in zip(CASES, case_batches(4)):
        got, aux = fn(b["v"], b["t"], b["labels"], b["valid"], params)
        total, m2m, kd = oracle_cvsc(b["v"], b["t"], b["labels"], b["valid"], g, 0.05, 3.0)
        np.testing.assert_allclose(aux["m2m"], m2m, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(aux["kd"], kd, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got, total, rtol=RTOL, atol=ATOL)
        self.assertEqual(float(aux["num_identities"]), p)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cmsp(self):
    fn = self.variant(losses.cmsp_loss, static_argnums=(4, 5, 6))
    for b in case_batches(5):
      for intra, distance, kk in (("mean", "euclidean", None), ("hardest", "euclidean", 2),
                                  ("hardest", "cosine", 3)):
        got = fn(b["v"], b["labels"], b["modality"], b["valid"], intra, distance, kk)
        want = oracle_cmsp(b["v"], b["labels"], b["modality"], b["valid"], intra, distance, kk)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_distance_consistency(self):
    fn = self.variant(losses.distance_consistency_loss, static_argnums=(4, 5))
    for b in case_batches(6):
      for kk, distance in ((None, "euclidean"), (2, "euclidean"), (1, "cosine")):
        got = fn(b["f"], b["labels"], b["modality"], b["valid"], kk, distance)
        want = oracle_dc(b["f"], b["labels"], b["modality"], b["valid"], kk, distance)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pair_representation(self):
    rng = np.random.default_rng(7)
    a = rng.normal(size=(5, D_J)).astype(np.float32)
    bb = rng.normal(size=(5, D_J)).astype(np.float32)
    for kind in losses.PAIR_KINDS:
      params = pair_params_for(kind, seed=3)
      got = self.variant(functools.partial(losses.pair_representation, kind))(params, a, bb)
      want = np.stack([oracle_pair(kind, params, a[i], bb[i]) for i in range(5)])
      np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
      np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_eees_loss(self):
    for kind in ("sum", "cross_attention"):
      cfg = full_config(kind)
      params = pair_params_for(kind)
      fn = self.variant(lambda o, t, lab, mod, val, pp, cfg=cfg: losses.eees_loss(
          o, t, lab, mod, val, cfg, pp))
      for b in case_batches(8):
        total, metrics = fn(outputs_of(b), b["t"], b["labels"], b["modality"], b["valid"], params)
        want = oracle_eees(b, cfg, params)
        for name, value in want.items():
          np.testing.assert_allclose(metrics[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
        weighted = sum(cfg[name.split("/")[1]]["weight"] * value for name, value in want.items())
        np.testing.assert_allclose(total, weighted, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# Properties.


def eees_fn(cfg):
  return jax.jit(lambda o, t, lab, mod, val, pp: losses.eees_loss(o, t, lab, mod, val, cfg, pp))


def test_padding_changes_nothing_and_gets_no_gradient():
  """Same batch with and without garbage (NaN, inf) rows: same losses, zero gradient on the
  padded rows, finite gradients everywhere."""
  cfg = full_config("cross_attention")
  params = pair_params_for("cross_attention")
  b_pad = make_batch(3, 2, shuffle=True, seed=11)
  b = {key: val[b_pad["valid"]] for key, val in b_pad.items()}
  pad_rows = np.flatnonzero(~b_pad["valid"])
  for key in ("f", "v", "t", "logits"):  # padding may hold anything, even NaN or inf
    b_pad[key][pad_rows[0]] = np.nan
    b_pad[key][pad_rows[1]] = np.inf
  grad_fn = jax.jit(jax.value_and_grad(
      lambda o, t, lab, mod, val, pp: losses.eees_loss(o, t, lab, mod, val, cfg, pp),
      argnums=(0, 1), has_aux=True))
  (total, metrics), _ = grad_fn(outputs_of(b), b["t"], b["labels"], b["modality"], b["valid"],
                                params)
  (total_p, metrics_p), (g_out, g_t) = grad_fn(outputs_of(b_pad), b_pad["t"], b_pad["labels"],
                                               b_pad["modality"], b_pad["valid"], params)
  for name in metrics:
    np.testing.assert_allclose(metrics_p[name], metrics[name], rtol=RTOL, atol=ATOL,
                               err_msg=name)
  pad = ~b_pad["valid"]
  for g in list(g_out.values()) + [g_t]:
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(np.asarray(g)[pad], 0.0)
  assert np.any(np.asarray(g_out["v"])[~pad] != 0)


def test_permutation_invariance():
  cfg = full_config("cross_attention", cmsp={"intra": "mean"}, dc={"hardest_k": 2})
  params = pair_params_for("cross_attention")
  fn = eees_fn(cfg)
  b = make_batch(4, 3, shuffle=False, seed=12)
  _, m = fn(outputs_of(b), b["t"], b["labels"], b["modality"], b["valid"], params)
  bp = permute(b, 13)
  _, mp = fn(outputs_of(bp), bp["t"], bp["labels"], bp["modality"], bp["valid"], params)
  assert set(m) == set(mp)
  for name in m:
    np.testing.assert_allclose(mp[name], m[name], rtol=RTOL, atol=ATOL, err_msg=name)


def test_cmsp_zero_when_inter_equals_intra():
  """Rows of an identity on a regular simplex (all same-identity distances equal, non-zero):
  d_inter = d_intra for every anchor, so the loss is 0; breaking one distance makes it > 0."""
  p, k = 3, 2
  labels = np.tile(np.repeat(np.arange(p), k), 3).astype(np.int32)
  modality = np.array([0] * (2 * p * k) + [1] * (p * k), np.int32)
  n = labels.size
  centres = np.random.default_rng(0).normal(size=(p, n)) * 5
  z = (centres[labels] + np.eye(n)).astype(np.float32)  # same-identity distances all sqrt(2)
  valid = np.ones(n, bool)
  for intra, kk in (("mean", None), ("hardest", k)):
    got = losses.cmsp_loss(z, labels, modality, valid, intra=intra, k=kk)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)
    got = losses.distance_consistency_loss(z, labels, modality, valid, k=kk)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)
  z2 = z.copy()
  z2[-1] += 3.0 * np.eye(n)[-1]  # one infrared row moves away from its identity
  assert float(losses.cmsp_loss(z2, labels, modality, valid)) > 1e-3


def test_ese_falls_when_image_and_text_agree():
  """Moving every text towards its identity's image feature (and finally making image and text
  features of an identity equal) lowers the loss step by step."""
  b = make_batch(4, 2, shuffle=True, seed=14, n_pad=0)
  rng = np.random.default_rng(15)
  centre = rng.normal(size=(NUM_CLASSES, D_J)).astype(np.float32)
  t_random = rng.normal(size=b["t"].shape).astype(np.float32)
  args = (b["labels"], b["valid"], b["modality"])
  values = []
  for alpha in (0.0, 0.5, 1.0):
    v = centre[b["labels"]] + (1 - alpha) * rng.normal(size=b["v"].shape).astype(np.float32)
    t = alpha * centre[b["labels"]] + (1 - alpha) * t_random
    values.append(float(losses.ese_loss(v, t, *args, tau=0.1)))
  assert values[0] > values[1] > values[2], values


def test_cvsc_teacher_gets_no_gradient():
  """The teacher depends on pair_fn's parameters and on v, yet passes no gradient back."""
  b = make_batch(3, 2, shuffle=True, seed=16)
  params = pair_params_for("linear")

  def cvsc(v, pp):
    pair_fn = functools.partial(losses.pair_representation, "linear", pp)
    return losses.cvsc_loss(v, b["t"], b["labels"], b["valid"], pair_fn, tau=0.05)

  (value, aux), (g_v, g_params) = jax.value_and_grad(cvsc, argnums=(0, 1), has_aux=True)(
      b["v"], params)
  # The teacher is used in the forward pass: other pair parameters change the value ...
  other = jax.tree.map(lambda x: 3.0 * x[::-1], params)
  assert abs(float(cvsc(b["v"], other)[1]["kd"]) - float(aux["kd"])) > 1e-4
  # ... but its parameters receive exactly zero gradient.
  for g in jax.tree.leaves(g_params):
    np.testing.assert_array_equal(g, 0.0)

  # Gradient wrt v equals that of a reference in which the teacher probabilities are constants
  # computed by the NumPy oracle (so v reaches the loss only through m2m and the student).
  g = functools.partial(oracle_pair, "linear", params)
  idx = np.flatnonzero(b["valid"])
  ids = sorted(set(b["labels"][idx].tolist()))
  vn_np, tn_np = np_l2(b["v"]), np_l2(b["t"])
  tbar_np = np.stack([np_l2(tn_np[idx][b["labels"][idx] == c].mean(0)) for c in ids])
  vbar_np = np.stack([np_l2(vn_np[idx][b["labels"][idx] == c].mean(0)) for c in ids])
  temp = 4.0
  p_teacher = np.stack([np.exp(np_log_softmax(g(vbar_np[c], tbar_np[c]) @ tbar_np.T / temp))
                        for c in range(len(ids))])
  rows = np.array([ids.index(y) for y in b["labels"][idx]])
  tbar = jnp.asarray(tbar_np, jnp.float32)
  one_hot = jnp.asarray(b["labels"][idx][None, :] == np.array(ids)[:, None], jnp.float32)

  def reference(v):
    vn = v[idx] / jnp.linalg.norm(v[idx], axis=1, keepdims=True)
    vbar = one_hot @ vn
    vbar = vbar / jnp.linalg.norm(vbar, axis=1, keepdims=True)
    s = vbar @ tbar.T / 0.05
    m2m = 0.5 * (-jnp.mean(jnp.diag(jax.nn.log_softmax(s, axis=1)))
                 - jnp.mean(jnp.diag(jax.nn.log_softmax(s, axis=0))))
    log_ps = jax.nn.log_softmax(vn @ tbar.T / temp, axis=1)
    pt = jnp.asarray(p_teacher[rows], jnp.float32)
    kd = temp ** 2 * jnp.mean(jnp.sum(pt * (jnp.log(pt) - log_ps), axis=1))
    return m2m + kd

  np.testing.assert_allclose(reference(jnp.asarray(b["v"])), value, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(g_v, jax.grad(reference)(jnp.asarray(b["v"])), rtol=1e-3,
                             atol=1e-5)


def degenerate_batches():
  """(name, batch) pairs, each padded to 12 rows."""
  rng = np.random.default_rng(17)
  n = 12

  def batch(labels, modality, valid):
    return dict(labels=np.asarray(labels, np.int32), modality=np.asarray(modality, np.int32),
                valid=np.asarray(valid, bool), f=rng.normal(size=(n, D_F)).astype(np.float32),
                v=rng.normal(size=(n, D_J)).astype(np.float32),
                t=rng.normal(size=(n, D_J)).astype(np.float32),
                logits=rng.normal(size=(n, NUM_CLASSES)).astype(np.float32))

  on = [True] * 9 + [False] * 3
  dup = batch([1, 1, 1, 1, 2, 2, 2, 2, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0], on)
  for key in ("f", "v", "t"):  # rows 0 and 1, and 0 and 8, identical: distances exactly 0
    dup[key][1] = dup[key][0]
    dup[key][8] = dup[key][0]
  return [
      ("duplicate_rows", dup),
      # identity 5 has a single view; the others are complete
      ("one_view", batch([1, 1, 5, 1, 2, 2, 2, 1, 2, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0], on)),
      ("one_identity", batch([3] * 12, [0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0], on)),
      # identity 4 visible only, identity 6 infrared only, identity 2 both
      ("one_modality", batch([4, 4, 4, 6, 6, 2, 2, 2, 2, 0, 0, 0],
                             [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0, 0], on)),
      ("all_invalid", batch(rng.integers(0, 3, n), rng.integers(0, 2, n), [False] * n)),
      ("single_row", batch([7] + [0] * 11, [1] + [0] * 11, [True] + [False] * 11)),
  ]


def test_degenerate_batches_finite_and_match_oracle():
  kinds = ("sum", "cross_attention")
  for kind in kinds:
    cfg = full_config(kind, cmsp={"hardest_k": 3})
    params = pair_params_for(kind)
    grad_fn = jax.jit(jax.value_and_grad(
        lambda o, t, lab, mod, val, pp: losses.eees_loss(o, t, lab, mod, val, cfg, pp),
        argnums=(0, 1, 5), has_aux=True))
    for name, b in degenerate_batches():
      (total, metrics), grads = grad_fn(outputs_of(b), b["t"], b["labels"], b["modality"],
                                        b["valid"], params)
      assert np.isfinite(float(total)), (kind, name)
      for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)), (kind, name)
      want = oracle_eees(b, cfg, params)
      for term, value in want.items():
        np.testing.assert_allclose(metrics[term], value, rtol=RTOL, atol=ATOL,
                                   err_msg=f"{kind} {name} {term}")
      if name == "all_invalid":
        np.testing.assert_array_equal(total, 0.0)
      if name in ("one_identity", "single_row"):  # nothing to contrast or match against
        np.testing.assert_allclose(metrics["loss/cvsc"], 0.0, atol=1e-6)
        np.testing.assert_allclose(metrics["loss/wrt"], 0.0, atol=1e-6)


def test_total_is_weighted_sum_and_disabled_terms_are_absent():
  b = make_batch(3, 2, shuffle=True, seed=18)
  params = pair_params_for("linear")
  cfg = full_config("linear", ese={"enabled": False}, dc={"enabled": False},
                    wrt={"weight": 0.37}, cvsc={"weight": 2.5})
  total, metrics = eees_fn(cfg)(outputs_of(b), b["t"], b["labels"], b["modality"], b["valid"],
                                params)
  assert "loss/ese" not in metrics and "loss/dc" not in metrics
  terms = ("id", "wrt", "cvsc", "cmsp")
  assert {f"loss/{t}" for t in terms} <= set(metrics)
  weighted = sum(cfg[t]["weight"] * float(metrics[f"loss/{t}"]) for t in terms)
  np.testing.assert_allclose(total, weighted, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/total"], total)
  np.testing.assert_allclose(metrics["loss/cvsc"],
                             metrics["loss/cvsc_m2m"] + metrics["loss/cvsc_kd"], rtol=1e-5)
  # Everything off: total 0, only the total reported.
  off = full_config("sum", **{s: {"enabled": False} for s in ("id", "wrt", "ese", "cvsc",
                                                               "cmsp", "dc")})
  total, metrics = eees_fn(off)(outputs_of(b), b["t"], b["labels"], b["modality"], b["valid"],
                                None)
  assert set(metrics) == {"loss/total"} and float(total) == 0.0


def test_config_and_argument_errors():
  b = make_batch(2, 1, shuffle=False, seed=19, n_pad=0)
  cfg = full_config("linear")
  with np.testing.assert_raises_regex(ValueError, "pair_params"):
    losses.eees_loss(outputs_of(b), b["t"], b["labels"], b["modality"], b["valid"], cfg, None)
  broken = full_config()
  del broken["cvsc"]["kd_temperature"]
  with np.testing.assert_raises_regex(ValueError, "cvsc.kd_temperature"):
    losses.eees_loss(outputs_of(b), b["t"], b["labels"], b["modality"], b["valid"], broken)
  with np.testing.assert_raises_regex(ValueError, "hardest"):
    losses.cmsp_loss(b["v"], b["labels"], b["modality"], b["valid"], intra="hardest")
  with np.testing.assert_raises_regex(ValueError, "divide"):
    losses.init_pair_params(jax.random.key(0), "cross_attention", 10, num_heads=3)
  with np.testing.assert_raises_regex(ValueError, "modality"):
    losses.ese_loss(b["v"], b["t"], b["labels"], b["valid"], within_modality=True)
  with np.testing.assert_raises_regex(ValueError, "pair kind"):
    losses.init_pair_params(jax.random.key(0), "concat", D_J)
  with np.testing.assert_raises(AssertionError):  # chex: float labels rejected
    losses.identity_loss(b["logits"], b["labels"].astype(np.float32), b["valid"])


def test_ml_collections_config_and_bf16_inputs():
  import ml_collections
  b = make_batch(3, 2, shuffle=True, seed=20)
  cfg = full_config("sum")
  _, m32 = eees_fn(cfg)(outputs_of(b), b["t"], b["labels"], b["modality"], b["valid"], None)
  cd = ml_collections.ConfigDict(cfg)
  o16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), outputs_of(b))
  total, m16 = losses.eees_loss(o16, jnp.asarray(b["t"], jnp.bfloat16), b["labels"],
                                b["modality"], b["valid"], cd)
  assert total.dtype == jnp.float32
  for name in m32:  # bf16 rounding of the inputs only
    np.testing.assert_allclose(m16[name], m32[name], rtol=5e-2, atol=5e-2, err_msg=name)
