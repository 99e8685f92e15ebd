"""Float64 NumPy reference for SPEC §2: clean scores, their top-k counts, the aux loss and its gradients.

Everything is computed in float64 from the inputs as given (bf16/f16/f32 values are cast exactly). Ranking
uses np_reference.rank, the literal SPEC §1.4 rule (descending, ties to the lower index, -0.0 == +0.0,
NaN last).
"""
from __future__ import annotations

import numpy as np

import np_reference as npr

EPS = 1e-20


def _rows(x):
  x = np.asarray(x).astype(np.float64)
  return x.reshape(-1, x.shape[-1])


def clean_scores(logits, score_function):
  """float64 [T, E]: softmax, or sigmoid / sqrtsoftplus normalised over all E (+1e-20)."""
  x = _rows(logits)
  if score_function == "softmax":
    return npr.softmax(x)
  a = npr.scores(x, score_function)
  with np.errstate(invalid="ignore"):
    return a / (a.sum(-1, keepdims=True) + EPS)


def topk_counts(scores, topk):
  """int64 [E]: how many rows have each expert among their top-k of `scores` (SPEC §1.4 order)."""
  s = _rows(scores)
  chosen = npr.rank(s)[:, :topk]
  return np.bincount(chosen.reshape(-1), minlength=s.shape[-1])


def topk_margin(scores, topk):
  """Per row, the relative gap between the k-th and (k+1)-th best score (inf when k = E or tied)."""
  s = _rows(scores)
  if topk >= s.shape[-1]:
    return np.full(s.shape[0], np.inf)
  v = np.take_along_axis(s, npr.rank(s), -1)
  a, b = v[:, topk - 1], v[:, topk]
  with np.errstate(invalid="ignore", divide="ignore"):
    gap = np.abs(a - b) / np.maximum(np.abs(a), np.finfo(np.float64).tiny)
  return np.where((a == b) | np.isnan(a) | np.isnan(b), np.inf, gap)


def coefficient(num_experts, coeff, topk, total_num_tokens):
  return 0.0 if total_num_tokens == 0 else num_experts * coeff / (topk * total_num_tokens**2)


def aux_loss(probs, tpe, *, topk, coeff, num_experts=None, total_num_tokens=None):
  p = np.asarray(probs).astype(np.float64)
  T, C = p.shape
  c = coefficient(num_experts or C, coeff, topk, T if total_num_tokens is None else total_num_tokens)
  return c * np.sum(p.sum(0) * np.asarray(tpe, np.float64))


def aux_loss_grad(probs_shape, tpe, *, topk, coeff, num_experts=None, total_num_tokens=None):
  """d loss / d probs: C_coeff · tpe[c] on every row."""
  T, C = probs_shape
  c = coefficient(num_experts or C, coeff, topk, T if total_num_tokens is None else total_num_tokens)
  return np.broadcast_to(c * np.asarray(tpe, np.float64), probs_shape)


def clean_scores_vjp(logits, dscores, score_function):
  """d sum(scores · dscores) / d logits, float64 with the shape of logits."""
  x = _rows(logits)
  g = np.asarray(dscores, np.float64).reshape(x.shape)
  if score_function == "softmax":
    p = npr.softmax(x)
    return (p * (g - (g * p).sum(-1, keepdims=True))).reshape(np.shape(logits))
  a = npr.scores(x, score_function)
  S = a.sum(-1, keepdims=True) + EPS
  h = g / S - (g * a).sum(-1, keepdims=True) / S**2
  da = a * (1 - a) if score_function == "sigmoid" else npr.sigmoid(x) / (2 * a + EPS)
  return (h * da).reshape(np.shape(logits))


def aux_loss_from_logits(logits, tpe, *, topk, coeff, score_function="softmax", total_num_tokens=None):
  return aux_loss(clean_scores(logits, score_function), tpe, topk=topk, coeff=coeff,
                  total_num_tokens=total_num_tokens)


def aux_loss_from_logits_grad(logits, tpe, *, topk, coeff, score_function="softmax", total_num_tokens=None):
  x = _rows(logits)
  dscores = aux_loss_grad(x.shape, tpe, topk=topk, coeff=coeff, total_num_tokens=total_num_tokens)
  return clean_scores_vjp(logits, dscores, score_function)
