"""The one place that finds adapters in a tree, names its leaves and counts live ranks.

Every module of jaxrank finds adapter layers, gate leaves and path keys through this file.

* A *path* is the ``/``-joined name of an adapted layer, as in the base model
  (``'encoder/layer/0/attention/self/query'``); the root layer (an ``nn.Dense`` wrapped on its
  own) has the path ``''``.
* A *key* is the tuple of names of one leaf: ``('lora', 'encoder', ..., 'query', 'A')``.
  :func:`keypath_names` reads it off a JAX key path, whatever the tree: plain dicts,
  ``FrozenDict``, the trainable dict, an ``optax.partition``-masked tree (its ``MaskedNode``
  leaves hold nothing) or an NNX ``State`` (the trailing ``.value`` of a Variable is dropped).
  Leaves are matched by their names, never by the container type.
* The host-side global top-k (:func:`top_k_masks`, :func:`keep_top_ranks`) runs outside
  ``jit`` on concrete arrays; inside ``jit`` use :func:`jaxrank.top_budget_masks`.

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrank
  >>> from jaxrank import _tree
  >>> model = jaxrank.wrap(nn.Dense(4, name="proj"), adapter=jaxrank.SoRA(rank=3))
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 2)))
  >>> sorted(_tree.adapter_layers(model, variables)), _tree.path_key(("a", "b"))
  ([''], 'a/b')
  >>> _tree.key_tuple(""), _tree.key_tuple("a/b")
  ((), ('a', 'b'))
  >>> capped = _tree.keep_top_ranks(model, variables, 2, "g", score=abs, dropped=lambda g: 0 * g)
  >>> _tree.live_rank_total(model, variables), _tree.live_rank_total(model, capped)
  (3, 2)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxrank import _adapter

Array = jax.Array
Key = tuple[str, ...]
Variables = Mapping[str, Any]

LORA = "lora"
GATES = "gates"


# --- trees and specs ----------------------------------------------------------------------------
def plain(tree) -> dict:
  """A plain (mutable, shallow) ``dict`` of a ``FrozenDict`` or any mapping."""
  return flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else dict(tree)


def adapter_spec(model_or_adapter) -> _adapter.LoRA:
  """The adapter spec of a model returned by ``jaxrank.wrap``, or the spec itself."""
  adapter = getattr(model_or_adapter, "adapter", model_or_adapter)
  if not isinstance(adapter, _adapter.LoRA):
    raise TypeError(
        "Expected a model returned by jaxrank.wrap or an adapter spec such as jaxrank.LoRA(), "
        f"got {type(model_or_adapter).__name__}."
    )
  return adapter


# --- names and keys -------------------------------------------------------------------------------
def _entry_name(entry) -> str:
  for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def keypath_names(keypath) -> Key:
  """The names along a JAX key path; an NNX Variable's trailing ``.value`` is dropped."""
  entries = list(keypath)
  if entries and isinstance(entries[-1], jax.tree_util.GetAttrKey) and entries[-1].name == "value":
    entries.pop()
  return tuple(_entry_name(entry) for entry in entries)


def path_key(keypath_or_names: Sequence) -> str:
  """The ``/``-joined path of a key path or a tuple of names (``''`` for the root)."""
  entries = tuple(keypath_or_names)
  if any(not isinstance(entry, (str, int)) for entry in entries):
    entries = keypath_names(entries)
  return "/".join(str(entry) for entry in entries)


def key_tuple(path: str) -> Key:
  """The names of a ``/``-joined path: ``'a/b'`` → ``('a', 'b')``, the root ``''`` → ``()``."""
  return tuple(path.split("/")) if path else ()


def leaf_key(collection: str, path: str, name: str) -> Key:
  """The key of leaf ``name`` of the layer at ``path`` in ``collection``."""
  return (collection, *key_tuple(path), name)


def leaves_by_key(tree) -> dict[Key, Any]:
  """Every leaf of ``tree`` by its key (see :func:`keypath_names`)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {keypath_names(keypath): leaf for keypath, leaf in flat}


def replace_leaves(tree, new_leaves: Mapping[Key, Array]):
  """``tree`` with the leaves named in ``new_leaves`` replaced (structure and dtypes kept)."""

  def pick(keypath, leaf):
    new = new_leaves.get(keypath_names(keypath))
    return leaf if new is None else jnp.asarray(new).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(pick, tree)


# --- gate leaves by name --------------------------------------------------------------------------
def is_named_leaf(keypath, name: str, collection: Optional[str] = None) -> bool:
  """Whether a key path ends in ``name`` (and passes through ``collection`` when given)."""
  names = keypath_names(keypath)
  if not names or names[-1] != name:
    return False
  return collection is None or collection in names[:-1]


def named_leaves(tree, name: str, collection: Optional[str] = None) -> list:
  """The leaves of ``tree`` named ``name`` (under ``collection`` when given), in tree order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [leaf for keypath, leaf in flat if is_named_leaf(keypath, name, collection)]


# --- adapter layers -----------------------------------------------------------------------------
class LayerKeys(NamedTuple):
  """The keys of one adapted layer's leaves."""

  down: Key
  up: Key
  gates: dict  # gate name -> key


def find_layers(leaves: Mapping[Key, Any], down_name: str, up_name: str,
                gate_names: Sequence[str]) -> dict[str, LayerKeys]:
  """Every adapted layer in ``leaves`` (from :func:`leaves_by_key`), by path, in path order.

  A layer is a ``lora/<path>/<down_name>`` leaf; its ``up`` factor must exist. Gates that are
  absent are left out of ``LayerKeys.gates`` (the caller decides whether that is an error).
  """
  layers = {}
  for key in sorted(leaves):
    if len(key) < 2 or key[0] != LORA or key[-1] != down_name:
      continue
    prefix = key[1:-1]
    up = (LORA, *prefix, up_name)
    if up not in leaves:
      raise ValueError(f"lora/{path_key(key[1:])} has no matching {up_name!r} factor.")
    gates = {name: (GATES, *prefix, name) for name in gate_names
             if (GATES, *prefix, name) in leaves}
    layers[path_key(prefix)] = LayerKeys(key, up, gates)
  return layers


class AdapterLayer(NamedTuple):
  """One adapted layer's variables."""

  down: jax.Array
  up: jax.Array
  gates: dict
  # leading axes added by nn.scan/nn.vmap (0 for an ordinary layer)
  stacked_axes: int

  @property
  def in_shape(self) -> tuple[int, ...]:
    return tuple(self.down.shape[self.stacked_axes:-1])

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.up.shape[self.stacked_axes + 1:])

  @property
  def num_matrices(self) -> int:
    """Adapted matrices in this layer (the stacked copies of an ``nn.scan`` layer count)."""
    return int(np.prod(self.down.shape[:self.stacked_axes]))


def adapter_layers(model_or_adapter, variables: Variables) -> dict[str, AdapterLayer]:
  """Every adapted layer, by ``/``-joined path, in path order."""
  adapter = adapter_spec(model_or_adapter)
  if LORA not in variables:
    raise ValueError("These variables hold no 'lora' collection (see jaxrank.wrap).")
  leaves = leaves_by_key(variables)
  layers = {}
  for path, keys in find_layers(leaves, adapter.down_name, adapter.up_name,
                                adapter.gate_names).items():
    missing = set(adapter.gate_names) - set(keys.gates)
    if missing:
      raise ValueError(
          f"gates/{path} lacks {sorted(missing)} needed by {type(adapter).__name__}: "
          "were these variables made with another adapter spec?"
      )
    down, up = leaves[keys.down], leaves[keys.up]
    gates = {name: leaves[key] for name, key in keys.gates.items()}
    kernel = leaves.get(leaf_key("params", path, "kernel"))
    if kernel is not None:
      stacked_axes = down.ndim + up.ndim - 2 - kernel.ndim
    elif gates:
      stacked_axes = next(iter(gates.values())).ndim - 1
    else:
      stacked_axes = 0
    layers[path] = AdapterLayer(down, up, gates, stacked_axes)
  if not layers:
    raise ValueError(
        f"No {type(adapter).__name__} adapters (factors {adapter.down_name!r}/{adapter.up_name!r}) "
        "in these variables: were they made with another adapter spec?"
    )
  return layers


# --- live ranks ---------------------------------------------------------------------------------
def rank_masks(model_or_adapter, variables: Variables) -> dict[str, jax.Array]:
  """Per layer, a bool per rank: True where the rank is alive (shape ``(..., rank)``)."""
  adapter = adapter_spec(model_or_adapter)
  masks = {}
  for path, layer in adapter_layers(adapter, variables).items():
    if layer.gates:
      masks[path] = adapter.rank_mask(layer.gates)
    else:
      masks[path] = jnp.ones(layer.down.shape[: layer.stacked_axes] + layer.down.shape[-1:], bool)
  return masks


def live_rank_total(model_or_adapter, variables: Variables) -> int:
  """The number of live ranks in the whole network (concrete variables)."""
  return int(sum(np.sum(np.asarray(m)) for m in rank_masks(model_or_adapter, variables).values()))


def num_matrices(model_or_adapter, variables: Variables) -> int:
  """The number of adapted matrices (stacked ``nn.scan`` copies count one each)."""
  return sum(layer.num_matrices for layer in adapter_layers(model_or_adapter, variables).values())


# --- a global top-k on host ---------------------------------------------------------------------
def top_k_masks(scores: Mapping[str, Any], k: int) -> dict[str, np.ndarray]:
  """Per path, True for the ``k`` globally highest scores (ties: the first in path order).

  Entries scored ``-inf`` or ``nan`` (dead ranks) are never kept.

  >>> import numpy as np
  >>> masks = top_k_masks({"a": np.array([0.1, 0.9]), "b": np.array([0.5, -np.inf])}, 2)
  >>> {p: m.tolist() for p, m in masks.items()}
  {'a': [False, True], 'b': [True, False]}
  """
  arrays = {path: np.asarray(s, np.float64) for path, s in scores.items()}
  flat = np.concatenate([a.reshape(-1) for a in arrays.values()]) if arrays else np.zeros(0)
  order = np.argsort(-np.nan_to_num(flat, nan=-np.inf), kind="stable")
  keep = np.zeros(flat.shape, bool)
  keep[order[:max(int(k), 0)]] = True
  keep &= np.isfinite(flat) | (flat == np.inf)
  masks, start = {}, 0
  for path, a in arrays.items():
    masks[path] = keep[start:start + a.size].reshape(a.shape)
    start += a.size
  return masks


def with_gate_values(variables: Variables, gate_name: str, values: Mapping[str, Any]) -> dict:
  """``variables`` with gate ``gate_name`` of each layer in ``values`` replaced (dtype kept)."""
  variables = plain(variables)
  gates = replace_leaves(plain(variables[GATES]),
                         {key_tuple(path) + (gate_name,): v for path, v in values.items()})
  return {**variables, GATES: gates}


def keep_top_ranks_total(model, variables: Variables, budget: int, gate_name: str, *,
                         score: Callable, dropped: Callable) -> dict:
  """Keeps the ``budget`` live ranks of highest ``score(gate)`` over the whole network.

  Every other rank's entry of gate ``gate_name`` becomes ``dropped(gate)`` (a value whose rank
  mask is False). Variables already at or under the budget come back unchanged. Host-side,
  outside ``jit``.
  """
  layers = adapter_layers(model, variables)
  masks = rank_masks(model, variables)
  if sum(int(np.sum(np.asarray(m))) for m in masks.values()) <= budget:
    return variables
  gates = {path: np.asarray(layer.gates[gate_name]) for path, layer in layers.items()}
  scores = {path: np.where(np.asarray(masks[path]), score(g), -np.inf) for path, g in gates.items()}
  keep = top_k_masks(scores, budget)
  new_gates = {path: np.where(keep[path], g, dropped(g)) for path, g in gates.items()}
  return with_gate_values(variables, gate_name, new_gates)


def keep_top_ranks(model, variables: Variables, budget_rank: int, gate_name: str, *,
                   score: Callable, dropped: Callable) -> dict:
  """:func:`keep_top_ranks_total` with ``budget = budget_rank × number of adapted matrices``.

  Makes a comparison one of equal final budgets (``cli.cap_to_budget``'s contract).
  """
  budget = int(budget_rank) * num_matrices(model, variables)
  return keep_top_ranks_total(model, variables, budget, gate_name, score=score, dropped=dropped)



# --- NNX state paths ----------------------------------------------------------------------------
# An NNX model keeps an adapted layer's factors and gates in sub-attributes named after the
# collections (``hidden/lora/A``, ``hidden/gates/g``, see ``jaxrank.nnx``), whereas the Linen
# variables put the collection first (``lora/hidden/A``). The functions below move between the
# two spellings of a key, and between a whole NNX state and the Linen-style variables dict.
ADAPTER_COLLECTIONS = (LORA, GATES)


def linen_key(names: Key, default_collection: str = "params") -> Key:
  """The Linen key of an NNX state key: ``(*path, 'lora', 'A')`` → ``('lora', *path, 'A')``.

  A key whose next-to-last name is not an adapter collection goes to ``default_collection``.

  >>> linen_key(("hidden", "lora", "A")), linen_key(("hidden", "kernel"))
  (('lora', 'hidden', 'A'), ('params', 'hidden', 'kernel'))
  >>> linen_key(("gates", "lagrange_multiplier"))
  ('gates', 'lagrange_multiplier')
  """
  names = tuple(str(n) for n in names)
  if len(names) >= 2 and names[-2] in ADAPTER_COLLECTIONS:
    return (names[-2], *names[:-2], names[-1])
  return (default_collection, *names)


def nnx_key(key: Key) -> Key:
  """The inverse of :func:`linen_key` (``('params', *path)`` → ``path``)."""
  collection, *rest = key
  if collection in ADAPTER_COLLECTIONS:
    return (*rest[:-1], collection, rest[-1])
  return tuple(rest)


def _nested(flat: Mapping[Key, Any]) -> dict:
  out: dict = {}
  for key, leaf in flat.items():
    node = out
    for name in key[:-1]:
      node = node.setdefault(name, {})
    node[key[-1]] = leaf
  return out


def to_linen_view(state, default_collection: str = "params") -> dict:
  """An NNX state (``nnx.State``, its pure form, or nested dicts) as Linen-style variables.

  ``{'params': ..., 'lora': {path: {A, B}}, 'gates': {path: {...}}}``; collections with no
  leaf are left out. Pure tree surgery: works under ``jit`` and on ``jax.eval_shape`` output.

  >>> import jax.numpy as jnp
  >>> state = {"hidden": {"kernel": jnp.ones(2), "lora": {"A": jnp.ones(1)}}}
  >>> view = to_linen_view(state)
  >>> sorted(view), list(view["lora"]["hidden"])
  (['lora', 'params'], ['A'])
  """
  return _nested({linen_key(names, default_collection): leaf
                  for names, leaf in leaves_by_key(state).items()})


def from_linen_view(view, like):
  """``like`` (an NNX state tree) with each leaf taken from the Linen-style ``view``.

  Leaves of ``like`` absent from ``view`` are kept; the structure (and Variable types) of
  ``like`` is kept, so the result can go to ``nnx.update`` or ``nnx.merge``.

  >>> import jax.numpy as jnp
  >>> like = {"hidden": {"lora": {"A": jnp.ones(1)}}}
  >>> from_linen_view({"lora": {"hidden": {"A": jnp.zeros(1)}}}, like)["hidden"]["lora"]["A"]
  Array([0.], dtype=float32)
  """
  leaves = leaves_by_key(view)

  def pick(keypath, leaf):
    new = leaves.get(linen_key(keypath_names(keypath)))
    return leaf if new is None else new

  return jax.tree_util.tree_map_with_path(pick, like)
