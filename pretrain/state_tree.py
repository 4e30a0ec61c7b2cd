"""Nested Python state (optimizer, scheduler, sampler, RNG dicts) <-> (named tensors, JSON
skeleton): how a checkpoint stores anything without pickle (pretrain/checkpoint.py)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import numpy as np
import safetensors.torch
import torch

from cosmofm.data_cards.errors import InputError

SKELETON_FORMAT = "cosmofm-state-1"

# ---------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON skeleton)
# ---------------------------------------------------------------------------------
#
# Skeleton encoding: None/bool/int/str and finite floats are stored as themselves
# (JSON keeps 1 and 1.0 apart); a JSON array is a Python list; every JSON object is
# a tagged node {"type": ...}: "dict" (str keys in "items", any other keys as
# encoded [key, value] "pairs"), "tuple", "float" (nan/inf), "tensor", "ndarray",
# "npscalar". Tensors are named by their path, e.g. "state/0/exp_avg".


@functools.lru_cache(maxsize=None)
def _safetensors_supports(dtype: torch.dtype) -> bool:
    """Ask safetensors itself (its dtype list grows between versions)."""
    try:
        safetensors.torch.save({"x": torch.empty(0, dtype=dtype)})
    except Exception:
        return False
    return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _escape(component: str) -> str:
    # '/' separates path components in tensor names, so escape it (and '%', the escape).
    return component.replace("%", "%25").replace("/", "%2F")


def _display(path: tuple[str, ...]) -> str:
    return "/".join(path) or "<root>"


class _Flattener:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[str, int]] = set()
        self._open_containers: set[int] = set()

    def _unique_name(self, path: tuple[str, ...]) -> str:
        # Distinct keys can print alike ({0: a, "0": b}); the skeleton records the
        # real name, so any unique suffix will do.
        base = "/".join(_escape(p) for p in path) or "_"
        name, n = base, 0
        while name in self.tensors:
            n += 1
            name = f"{base}#{n}"
        return name

    def _add_tensor(self, t: torch.Tensor, path: tuple[str, ...]) -> str:
        t = t.detach()
        if t.layout != torch.strided:
            raise InputError(_display(path), f"is a {t.layout} tensor; safetensors stores only dense tensors",
                             "convert it with .to_dense() in the state_dict()")
        if not _safetensors_supports(t.dtype):
            raise InputError(_display(path), f"has dtype {t.dtype}, which safetensors cannot store",
                             "cast it to a supported dtype in the state_dict()")
        t = t.to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of one
        # buffer); copy every tensor after the first one on a given storage.
        if t.numel() == 0:
            t = t.clone()  # an empty view may still point into a shared buffer
        else:
            key = (str(t.device), t.untyped_storage().data_ptr())
            if key in self._storages:
                t = t.clone()
                key = (str(t.device), t.untyped_storage().data_ptr())
            self._storages.add(key)
        name = self._unique_name(path)
        self.tensors[name] = t
        return name

    def _array_node(self, arr: np.ndarray, path: tuple[str, ...], kind: str) -> dict:
        if arr.dtype.hasobject or arr.dtype.fields is not None:
            raise InputError(_display(path), f"is a numpy array of dtype {arr.dtype}, which cannot be stored "
                             "without pickle", "store plain numeric arrays")
        arr = np.array(arr, order="C", copy=True)  # writable, contiguous, owns its memory
        try:
            tensor = torch.from_numpy(arr)
            encoding = "tensor" if _safetensors_supports(tensor.dtype) else "bytes"
        except TypeError:  # strings, datetimes, non-native byte order, ...
            encoding = "bytes"
        if encoding == "bytes":
            # Raw bytes + numpy dtype string round-trip any fixed-size dtype bit-exactly.
            tensor = torch.from_numpy(np.frombuffer(arr.tobytes(), dtype=np.uint8).copy())
        name = self._add_tensor(tensor, path)
        return {"type": kind, "name": name, "dtype": arr.dtype.str, "shape": list(arr.shape),
                "encoding": encoding}

    def _float(self, x: float):
        return x if math.isfinite(x) else {"type": "float", "value": repr(float(x))}

    def encode_key(self, key, path: tuple[str, ...]):
        if key is None or isinstance(key, (bool, str)) or type(key) is int:
            return key
        if isinstance(key, int):
            return int(key)
        if isinstance(key, float) and not isinstance(key, np.floating):
            return self._float(key)
        if isinstance(key, tuple):
            return {"type": "tuple", "items": [self.encode_key(k, path) for k in key]}
        raise InputError(_display(path), f"has a dict key of type {type(key).__name__} ({key!r})",
                         "use str, int, float, bool, None or tuples of these as keys")

    def encode(self, obj, path: tuple[str, ...]):
        # Order matters: np.float64 subclasses float and bool subclasses int.
        if isinstance(obj, torch.Tensor):
            return {"type": "tensor", "name": self._add_tensor(obj, path),
                    "dtype": _dtype_name(obj.dtype), "shape": list(obj.shape)}
        if isinstance(obj, np.ndarray):
            return self._array_node(obj, path, "ndarray")
        if isinstance(obj, np.generic):
            return self._array_node(np.asarray(obj), path, "npscalar")
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return self._float(obj)
        if isinstance(obj, (Mapping, list, tuple)):
            return self._encode_container(obj, path)
        raise InputError(_display(path), f"holds a {type(obj).__name__}, which a checkpoint cannot store",
                         "make state_dict() return only tensors, numpy arrays, numbers, strings, "
                         "None, and dicts/lists/tuples of these")

    def _encode_container(self, obj, path: tuple[str, ...]):
        if id(obj) in self._open_containers:
            raise InputError(_display(path), "contains itself (a reference cycle)", "break the cycle")
        self._open_containers.add(id(obj))
        try:
            if isinstance(obj, list):
                return [self.encode(v, path + (str(i),)) for i, v in enumerate(obj)]
            if isinstance(obj, tuple):
                return {"type": "tuple", "items": [self.encode(v, path + (str(i),)) for i, v in enumerate(obj)]}
            if all(type(k) is str for k in obj):
                return {"type": "dict", "items": {k: self.encode(v, path + (k,)) for k, v in obj.items()}}
            return {"type": "dict", "pairs": [[self.encode_key(k, path), self.encode(v, path + (str(k),))]
                                              for k, v in obj.items()]}
        finally:
            self._open_containers.discard(id(obj))


def flatten_state(obj) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a nested state into safetensors-ready tensors and a JSON-able skeleton.

    Accepts nested dict/list/tuple of None, bool, int, float (incl. nan/inf), str,
    torch tensors, numpy arrays and numpy scalars. Returned tensors are on the CPU,
    contiguous and never share memory (safetensors needs both); they may alias the
    input's CPU tensors, so write them before changing the input. Dict subclasses
    (OrderedDict) come back as dict and tuple subclasses (torch.Size) as tuple.
    """
    flattener = _Flattener()
    root = flattener.encode(obj, ())
    return flattener.tensors, {"format": SKELETON_FORMAT, "root": root}


def copied_state(obj):
    """A copy of a nested state (as `flatten_state` accepts) whose tensors share no memory with
    the input's: what a thread may write while training goes on changing the input. Live
    tensors (parameters, views with a graph) are copied too, which `copy.deepcopy` refuses."""
    tensors, skeleton = flatten_state(obj)
    return unflatten_state({name: t.clone() for name, t in tensors.items()}, skeleton)


class _Referencer(_Flattener):
    """Names tensors as `_Flattener` does but keeps them as they are (a DTensor stays a DTensor,
    on its device): for a writer that reads each process's shards itself (DCP)."""

    def _add_tensor(self, t: torch.Tensor, path: tuple[str, ...]) -> str:
        name = self._unique_name(path)
        self.tensors[name] = t.detach()
        return name


def reference_state(obj) -> tuple[dict[str, torch.Tensor], dict]:
    """`flatten_state` without moving or copying the tensors: (name -> tensor, skeleton).

    The names are the same as `flatten_state`'s (paths such as "state/cosmofm.x.weight/exp_avg"),
    so a skeleton from one process's state matches the tensors of another world size's.
    """
    referencer = _Referencer()
    root = referencer.encode(obj, ())
    return referencer.tensors, {"format": SKELETON_FORMAT, "root": root}


def skeleton_tensors(skeleton: dict) -> dict[str, tuple[str, list[int]]]:
    """Every tensor a skeleton names: name -> (dtype, shape), e.g. ("float32", [64, 32])."""
    if not isinstance(skeleton, dict) or skeleton.get("format") != SKELETON_FORMAT or "root" not in skeleton:
        raise InputError("skeleton", f"is not a {SKELETON_FORMAT} skeleton",
                         "pass the JSON written next to the tensors by save_checkpoint")
    found, stack = {}, [skeleton["root"]]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if node.get("type") == "tensor":
                found[node.get("name")] = (node.get("dtype"), node.get("shape"))
            elif node.get("type") in ("ndarray", "npscalar"):
                raise InputError("skeleton", f"array {node.get('name')!r} cannot be read from shards",
                                 "keep numpy arrays in the states saved whole")
            else:
                stack.extend(node.get("items", {}).values() if isinstance(node.get("items"), dict) else node.get("items", []))
                stack.extend(v for _k, v in node.get("pairs", []))
    return found


class _Unflattener:
    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors
        self.used: set[str] = set()

    def _bad(self, problem: str) -> InputError:
        return InputError("skeleton", problem, "the checkpoint is damaged or its files come from different saves; "
                          "use an earlier checkpoint")

    def _tensor(self, node: dict) -> torch.Tensor:
        name = node.get("name")
        if name not in self.tensors:
            raise self._bad(f"tensor {name!r} is in the skeleton but not in the tensor file")
        self.used.add(name)
        return self.tensors[name]

    def _array(self, node: dict) -> np.ndarray:
        tensor = self._tensor(node)
        dtype, shape = np.dtype(node["dtype"]), tuple(node["shape"])
        if node.get("encoding") == "bytes":
            arr = np.frombuffer(tensor.numpy().tobytes(), dtype=dtype).reshape(shape).copy()
        else:
            arr = tensor.numpy()
        if arr.dtype != dtype or arr.shape != shape:
            raise self._bad(f"array {node['name']!r} has dtype/shape {arr.dtype}/{arr.shape}, "
                            f"expected {dtype}/{shape}")
        return arr

    def decode(self, node):
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict):
            return node
        kind = node.get("type")
        if kind == "dict" and "items" in node:
            return {k: self.decode(v) for k, v in node["items"].items()}
        if kind == "dict":
            return {self.decode(k): self.decode(v) for k, v in node["pairs"]}
        if kind == "tuple":
            return tuple(self.decode(v) for v in node["items"])
        if kind == "float":
            return float(node["value"])
        if kind == "tensor":
            tensor = self._tensor(node)
            if _dtype_name(tensor.dtype) != node["dtype"] or list(tensor.shape) != node["shape"]:
                raise self._bad(f"tensor {node['name']!r} is {_dtype_name(tensor.dtype)}{list(tensor.shape)}, "
                                f"expected {node['dtype']}{node['shape']}")
            return tensor
        if kind == "ndarray":
            return self._array(node)
        if kind == "npscalar":
            return self._array(node)[()]
        raise self._bad(f"unknown node type {kind!r}")


def unflatten_state(tensors: Mapping[str, torch.Tensor], skeleton: dict):
    """Inverse of `flatten_state`: rebuild the nested object bit-exactly."""
    if not isinstance(skeleton, dict) or skeleton.get("format") != SKELETON_FORMAT or "root" not in skeleton:
        raise InputError("skeleton", f"is not a {SKELETON_FORMAT} skeleton",
                         "pass the JSON written next to the tensors by save_checkpoint")
    unflattener = _Unflattener(tensors)
    try:
        obj = unflattener.decode(skeleton["root"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise unflattener._bad(f"is malformed ({type(exc).__name__}: {exc})") from exc
    extra = sorted(set(tensors) - unflattener.used)
    if extra:
        raise unflattener._bad(f"the tensor file has tensors the skeleton does not mention: {extra[:5]}")
    return obj


