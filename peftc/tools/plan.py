"""The memory a training step of a rewritten graph needs, sized before it runs.

    peak = weights (by storage) + optimizer states
           + max(the most bytes alive during forward, loss and backward (activations autograd
                 saves, transients, gradients), gradients + the optimizer step's temporaries)

The graph is run once, forward and backward, on fake tensors (`FakeTensorMode`: shapes, dtypes and
storages, no data), so the plan follows whatever the passes did and takes seconds on a 70B-shaped
model captured on the `meta` device (planned with CPU kernels: meta's math attention would save the
probabilities that fused attention kernels do not). Two counts are made during that run:
1. activations: the distinct storages autograd saves for backward (`saved_tensors_hooks`), weights
   excluded;
2. the live bytes: every storage an op creates, until it is freed (`TorchDispatchMode`), whose
   maximum, gradients included, is the step's working memory.
Optimizer states are counted from the trainable parameters (AdamW: two moments in the parameters'
dtype; SGD with momentum: one; plain SGD: none), and torch's foreach Adam(W) step holds one more
parameter-sized temporary. Allocator caching and fragmentation are not modelled.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode

from peftc.errors import OptionError
from peftc.ir.attention import traced_masks_are_causal
from peftc.ir.graph import peftc_meta

__all__ = ["MemoryPlan", "plan"]

_OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd": 0, "momentum": 1}
_MiB = 2**20


@dataclass
class MemoryPlan:
    """Bytes of one training step; `str()` prints the breakdown in MiB."""

    batch: int
    seq: int
    optimizer: str
    # storage ("dense", "nf4", "trainable") -> bytes
    weights: dict[str, int] = field(default_factory=dict)
    trainable_parameters: int = 0  # elements
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0  # saved for backward
    # the most bytes alive during forward + backward, gradients and activations included
    working: int = 0
    # bytes the optimizer step holds besides weights and states: gradients and its temporaries
    step: int = 0
    world_size: int = 1
    # FSDP2: weights gathered at once beyond this rank's shards (the root's, two blocks)
    gathered: int = 0
    peak: int = 0

    def __str__(self) -> str:
        rows = [(f"weights ({name})", size) for name, size in self.weights.items()] + [
            ("gradients", self.gradients),
            (f"optimizer states ({self.optimizer})", self.optimizer_states),
            ("activations saved for backward", self.activations),
            ("working memory of forward + backward", self.working),
            ("gradients + temporaries of the optimizer step", self.step),
        ]
        if self.world_size > 1:
            rows.append(("weights gathered at once (root + 2 blocks)", self.gathered))
        rows.append(("predicted peak", self.peak))
        width = max(len(name) for name, _ in rows)
        per_rank = (
            f" per rank of {self.world_size} (FSDP2, blocks sharded)" if self.world_size > 1 else ""
        )
        lines = [
            f"memory plan{per_rank}: batch {self.batch} x sequence {self.seq}, "
            f"{self.trainable_parameters:,} trainable parameters"
        ]
        lines += [f"  {name.ljust(width)}  {size / _MiB:12.1f} MiB" for name, size in rows]
        return "\n".join(lines)


def plan(
    gm: fx.GraphModule,
    *,
    batch: int = 1,
    seq: int = 512,
    optimizer: str = "adamw",
    dtype: torch.dtype | str | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
    world_size: int = 1,
) -> MemoryPlan:
    """Size one training step of `gm` at `batch` x `seq` (its example inputs resized, or `inputs`).

    `world_size > 1` sizes one rank of FSDP2 as `peftc.distributed.shard` wraps the graph (each
    block, then the root; `batch` is the rank's): parameters, quantized storage, gradients and
    optimizer states are 1/N each (dim 0 padded to a multiple of N), and on top of them the root's
    weights stay gathered through the step while at most two blocks are gathered at once (the one
    computing and the one prefetched in backward).

    `dtype` (e.g. "bfloat16") checks that the graph computes in it: capture the model in the dtype
    it trains in. The loss is the mean cross-entropy of a causal LM's logits, else the mean of the
    first output.
    """
    _check_options(gm, optimizer, dtype, world_size)
    result = MemoryPlan(batch, seq, optimizer, world_size=world_size)
    model = _fake_model(gm)
    for name, t in model.state.items():
        if name not in model.constants:
            kind = _weight_kind(t, name in model.trainable)
            result.weights[kind] = result.weights.get(kind, 0) + _nbytes(t)
    result.trainable_parameters = sum(model.state[n].numel() for n in model.trainable)
    result.gradients = sum(_nbytes(model.state[n]) for n in model.trainable)
    example = inputs or _inputs(model.gm, batch, seq, model.device)
    result.activations, result.working = _run_step(model, example)
    if world_size > 1:
        _shard(result, model.gm, model.state, model.constants, world_size)
    # the optimizer step: gradients, and foreach Adam(W)'s one parameter-sized temporary (sqrt of
    # the 2nd moment)
    result.optimizer_states = _OPTIMIZERS[optimizer] * result.gradients
    result.step = result.gradients * (2 if optimizer in ("adam", "adamw") else 1)
    result.peak = (
        sum(result.weights.values())
        + result.optimizer_states
        + max(result.working + result.gathered, result.step)
    )
    return result


def _check_options(
    gm: fx.GraphModule, optimizer: str, dtype: torch.dtype | str | None, world_size: int
) -> None:
    """Refuse a world size, optimizer or dtype `plan` cannot take, and a graph not in `dtype`."""
    if not isinstance(world_size, int) or world_size < 1:
        raise OptionError(f"plan: world_size must be a positive integer, got {world_size!r}")
    if optimizer not in _OPTIMIZERS:
        raise OptionError(
            f"plan: optimizer must be one of {', '.join(_OPTIMIZERS)}, got {optimizer!r}"
        )
    if isinstance(dtype, str):
        dtype = (
            getattr(torch, dtype, None)
            if isinstance(getattr(torch, dtype, None), torch.dtype)
            else None
        )
        if dtype is None:
            raise OptionError("plan: dtype must name a torch dtype such as 'bfloat16'")
    floats = {p.dtype for p in gm.parameters() if p.is_floating_point()}
    if dtype is not None and floats != {dtype}:
        # the captured graph fixes its casts and dtype checks: cast afterwards, it is another model
        raise OptionError(
            f"plan: the graph computes in {', '.join(sorted(map(str, floats)))}, not {dtype}; "
            f"capture the model in {dtype} (model.to({dtype}) before peftc.capture) and plan that "
            "graph"
        )


class _FakeModel(NamedTuple):
    """`gm` (retargeted from meta) and its weights as fake tensors, trainable ones requiring
    grad."""

    gm: fx.GraphModule
    mode: FakeTensorMode
    device: torch.device
    state: dict[str, torch.Tensor]  # parameters, buffers and lifted constants by name
    constants: dict[str, torch.Tensor]
    trainable: set[str]


def _fake_model(gm: fx.GraphModule) -> _FakeModel:
    tensors = dict(gm.named_parameters(remove_duplicate=True)) | dict(
        gm.named_buffers(remove_duplicate=True)
    )
    constants = {name: t for name, t in _tensor_attributes(gm) if name not in tensors}
    trainable = {name for name, p in gm.named_parameters() if p.requires_grad}
    # a model captured on meta is planned as on CPU: meta dispatches attention to its math path,
    # which saves the attention probabilities that the fused kernels of CPU and GPU do not
    device = next((t.device for t in tensors.values()), torch.device("cpu"))
    if device.type == "meta":
        device, gm = torch.device("cpu"), _retarget(gm, torch.device("cpu"))
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    state = {name: _fake(fake, t, device, name in trainable) for name, t in tensors.items()}
    state |= {name: _fake(fake, t, device, False) for name, t in constants.items()}
    return _FakeModel(gm, fake, device, state, constants, trainable)


def _run_step(model: _FakeModel, example: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes autograd saves for backward, the most bytes alive at once) of forward, loss and
    backward on fake tensors."""
    fake, gm = model.mode, model.gm
    weights = {StorageWeakRef(t.untyped_storage()) for t in model.state.values()}
    saved: dict[StorageWeakRef, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in weights:
            saved[ref] = t.untyped_storage().nbytes()
        return t

    live = _LiveBytes(weights)
    # unpadded inputs: the real run takes the causal attention kernel, so does the plan
    unpadded = all(bool(v.all()) for name, v in example.items() if "mask" in name)
    causal = traced_masks_are_causal() if unpadded else contextlib.nullcontext()
    with fake, causal:
        fake_inputs = {k: _fake(fake, v, model.device, False) for k, v in example.items()}
        # the fake weights stay in place through backward too, where checkpointed blocks run again
        # (functional_call's own context, which it leaves when the forward returns)
        with (
            live,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            _reparametrize_module(gm, model.state),
        ):
            outputs = gm(**fake_inputs)
            loss = _loss(gm, outputs)
            loss.backward()
    return sum(saved.values()), live.peak


def _weight_kind(t: torch.Tensor, trainable: bool) -> str:
    return "trainable" if trainable else "quantized" if not t.is_floating_point() else "frozen"


def _shard(
    result: MemoryPlan,
    gm: fx.GraphModule,
    state: dict[str, torch.Tensor],
    constants: dict,
    world: int,
) -> None:
    """Per-rank figures under FSDP2 (see `plan`): what is sharded, and what is gathered at once."""
    from peftc.passes.outline import blocks
    from peftc.sites.regions import block_sites
    from peftc.tools.distributed import storage_names

    def shard(t: torch.Tensor) -> int:
        rows = -(-max(t.shape[0] if t.dim() else 1, 1) // world)
        return rows * (t.numel() // max(t.shape[0], 1) if t.dim() else 1) * t.element_size()

    sharded = {name for name, p in gm.named_parameters()} | set(storage_names(gm))
    paths = blocks(gm) or [site.path for site in block_sites(gm)]
    in_block = lambda name: next((p for p in paths if name.startswith(p + ".")), None)  # noqa: E731
    per_block: dict[str, int] = {}
    root = 0
    for kind in result.weights:
        result.weights[kind] = 0
    for name, t in state.items():
        if name in constants:
            continue
        kind = _weight_kind(t, t.requires_grad)
        size = shard(t) if name in sharded else _nbytes(t)
        result.weights[kind] += size
        block = in_block(name)
        if name in sharded and block is not None:
            per_block[block] = per_block.get(block, 0) + _nbytes(t)
        elif name in sharded:
            root += _nbytes(t) - size
    largest = sorted(per_block.values(), reverse=True)[:2]
    result.gathered = root + sum(largest)
    result.gradients = sum(shard(t) for t in state.values() if t.requires_grad)


def _fake(mode: Any, t: torch.Tensor, device: torch.device, trainable: bool) -> torch.Tensor:
    if t.device.type == "meta" and device.type != "meta":
        fake = FakeTensor(mode, t.detach(), device)
    else:
        fake = mode.from_tensor(t.detach())
    return fake.requires_grad_(True) if trainable else fake


def _retarget(gm: fx.GraphModule, device: torch.device) -> fx.GraphModule:
    """A copy of `gm` whose ops create and check tensors on `device` instead of meta (submodules
    shared)."""
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        node.args, node.kwargs = pytree.tree_map_only(
            torch.device, lambda d: device if d.type == "meta" else d, (node.args, node.kwargs)
        )
    retargeted = fx.GraphModule(gm, graph)
    from peftc.passes.outline import blocks

    for path in blocks(gm):  # outlined blocks run graphs of their own
        parent, _, name = path.rpartition(".")
        setattr(retargeted.get_submodule(parent), name, _retarget(gm.get_submodule(path), device))
    retargeted.meta.update(gm.meta)
    retargeted.training = gm.training
    return retargeted


def _tensor_attributes(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """Tensors the graph reads with get_attr that are neither parameters nor buffers (lifted
    constants)."""
    found = []
    for node in gm.graph.find_nodes(op="get_attr"):
        owner, _, attr = node.target.rpartition(".")
        value = getattr(gm.get_submodule(owner), attr, None)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            found.append((node.target, value))
    return found


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _inputs(
    gm: fx.GraphModule, batch: int, seq: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """The graph's example inputs at `batch` x `seq`: token ids and masks of ones, floats of
    zeros."""
    example = peftc_meta(gm).get("example_inputs")
    if not example:
        raise OptionError("plan: this graph records no example inputs; pass inputs={name: tensor}")
    out = {}
    fixed = _fixed_sizes(gm)
    for name, value in example.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2:
            raise OptionError(
                f"plan: input {name!r} is not a (batch, sequence, ...) tensor; pass inputs={{...}}"
            )
        shape = (batch, seq, *value.shape[2:])
        wrong = {d: n for d, n in fixed.get(name, {}).items() if shape[d] != n}
        if wrong:
            raise OptionError(
                f"plan: the graph was captured with input {name!r} fixed at "
                f"{' x '.join(str(n) for n in value.shape[:2])}, and cannot run at {batch} x "
                f"{seq}; capture it with dynamic shapes (peftc.capture(..., dynamic=True), "
                "example inputs of at least 2 x 2) or plan at the captured size"
            )
        fill = 1 if "mask" in name else 0
        out[name] = torch.full(shape, fill, dtype=value.dtype, device=device)
    return out


def _fixed_sizes(gm: fx.GraphModule) -> dict[str, dict[int, int]]:
    """{input: {dim: size}} of dims 0 and 1 the graph only runs at (concrete in its inputs)."""
    fixed = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            fixed[str(node.target)] = {
                d: val.shape[d] for d in range(min(val.dim(), 2)) if isinstance(val.shape[d], int)
            }
    return fixed


def _loss(gm: fx.GraphModule, outputs: Any) -> torch.Tensor:
    first = next(
        t
        for t in pytree.tree_leaves(outputs)
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )
    causal = (
        peftc_meta(gm).get("capture", {}).get("class", "").endswith(("ForCausalLM", "LMHeadModel"))
    )
    if causal and first.dim() == 3:
        targets = torch.zeros(first.shape[:2], dtype=torch.long, device=first.device)
        return torch.nn.functional.cross_entropy(first.flatten(0, 1), targets.flatten())
    return first.float().mean()


class _LiveBytes(TorchDispatchMode):
    """The most bytes held at once by storages the ops create (weights excluded). A storage is freed
    when the last tensor an op returned over it dies (a finalizer per tensor), or later if something
    else still holds it."""

    def __init__(self, weights: set[StorageWeakRef]):
        super().__init__()
        self.weights, self.current, self.peak = weights, 0, 0
        self.live: dict[StorageWeakRef, list[int]] = {}  # storage -> [bytes, tensors seen over it]
        self.lingering: set[StorageWeakRef] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ref in [r for r in self.lingering if r.expired()]:
            self.lingering.discard(ref)
            self.current -= self.live.pop(ref)[0]
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        self.peak = max(self.peak, self.current)
        return out

    def _track(self, t: torch.Tensor) -> None:
        ref = StorageWeakRef(t.untyped_storage())
        if ref in self.weights:
            return
        if ref not in self.live:
            self.live[ref] = [t.untyped_storage().nbytes(), 0]
            self.current += self.live[ref][0]
        self.live[ref][1] += 1
        weakref.finalize(t, self._release, ref)

    def _release(self, ref: StorageWeakRef) -> None:
        entry = self.live.get(ref)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            if ref.expired():
                self.current -= self.live.pop(ref)[0]
            else:
                self.lingering.add(ref)
