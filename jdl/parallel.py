"""Meshes, data-parallel and FSDP shardings, and multi-process start-up.

The same training code runs on one CPU, on eight devices or on several hosts; only
the mesh changes. Everything rests on JAX's own SPMD machinery: arrays carry a
`NamedSharding` over a `Mesh`, `jax.jit` partitions the program, and XLA inserts the
collectives (the gradient all-reduce of data parallelism, the parameter all-gathers
and gradient reduce-scatters of FSDP).

- The mesh comes from a string such as `"data:4,fsdp:2"` (`make_mesh`); one axis may
  be `-1`, "all the devices the others leave".
- Batches are split along their first dimension over the batch axes `("data", "fsdp")`
  (those the mesh has), so the global batch size must be a multiple of their product.
- Parameters and optimizer state are replicated (data parallelism) unless the mesh has
  an `fsdp` axis of size > 1: then every large array is split along its largest
  dimension that the `fsdp` size divides, and small ones stay replicated
  (`ShardingRules`). NNX partition metadata (`out_sharding`, formerly `sharding_names`,
  on an `nnx.Param`) and regex rules on parameter paths override that choice.
- Several processes (hosts) start with `initialize_distributed`; each loads its own rows
  of the data (`process_rows`) and `global_arrays` joins them into global arrays.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jdl.checkpoint import path_name
from jdl.data.pipeline import MeshPlacement, check_train_data
from jdl.errors import UserError

__all__ = [
    "BATCH_AXES",
    "ChunkShardings",
    "ShardingError",
    "ShardingRules",
    "batch_axes",
    "batch_sharding",
    "check_batch_size",
    "data_parallel_size",
    "global_arrays",
    "initialize_distributed",
    "make_mesh",
    "mesh_of",
    "parse_mesh_shape",
    "place_batches",
    "place_data",
    "place_for_fit",
    "process_rows",
    "replicated",
    "shard_state",
    "state_shardings",
]

BATCH_AXES = ("data", "fsdp")
"""Mesh axes a batch is split over, outermost first."""


class ShardingError(UserError, ValueError):
    """A mesh, sharding rule or batch size does not fit the devices or the arrays."""


# ----------------------------------------------------------------------------- meshes


def parse_mesh_shape(mesh_shape: str | Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Axis sizes from `"data:4,fsdp:2"` (or a dict), with one `-1` filled in.

    Args:
      mesh_shape: comma-separated `name:size` pairs, or {name: size}. At most one size
        may be -1: it becomes `num_devices` divided by the product of the others.
      num_devices: how many devices the mesh must use exactly.

    Returns:
      {axis name: size}, in the given order; the sizes multiply to `num_devices`.

    Raises:
      ShardingError: malformed text, repeated names, sizes < 1 (other than one -1), or
        sizes that do not multiply to `num_devices`.
    """
    if isinstance(mesh_shape, str):
        sizes: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in mesh_shape.split(","))):
            name, sep, size = part.partition(":")
            name = name.strip()
            if not sep or not name or not re.fullmatch(r"-?\d+", size.strip()):
                raise ShardingError(
                    f"mesh_shape {mesh_shape!r}: expected 'axis:size' pairs such as "
                    f"'data:4,fsdp:2' (size -1: the remaining devices), got {part!r}"
                )
            if name in sizes:
                raise ShardingError(f"mesh_shape {mesh_shape!r} names axis {name!r} twice")
            sizes[name] = int(size)
    else:
        sizes = {str(name): int(size) for name, size in mesh_shape.items()}
    if not sizes:
        raise ShardingError(f"mesh_shape {mesh_shape!r} has no axes; e.g. 'data:-1'")
    free = [name for name, size in sizes.items() if size == -1]
    bad = [name for name, size in sizes.items() if size < 1 and size != -1]
    if bad or len(free) > 1:
        raise ShardingError(
            f"mesh_shape {mesh_shape!r}: sizes must be >= 1, with at most one -1 "
            f"(the remaining devices)"
        )
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if free:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh_shape {mesh_shape!r}: {num_devices} devices do not divide into "
                f"groups of {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    if int(np.prod(list(sizes.values()))) != num_devices:
        raise ShardingError(
            f"mesh_shape {mesh_shape!r} needs {int(np.prod(list(sizes.values())))} devices, "
            f"but {num_devices} are available; use -1 for 'the rest', e.g. 'data:-1'"
        )
    return sizes


def make_mesh(
    mesh_shape: str | Mapping[str, int] = "data:-1",
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A `Mesh` over `devices` (default: all devices of all processes).

    Devices are ordered by (process, id) and laid out row-major, so the outermost axis
    varies slowest: each process's devices form one contiguous block of the batch
    axes, which is what `global_arrays` relies on.

    Raises:
      ShardingError: see `parse_mesh_shape`.
    """
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda device: (device.process_index, device.id))
    sizes = parse_mesh_shape(mesh_shape, len(devices))
    grid = np.array(devices, dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def mesh_of(tree: Any) -> Mesh | None:
    """The mesh of the first array in `tree` placed with a multi-device `NamedSharding`."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh's axes that split the batch: those of `BATCH_AXES` it has."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.shape)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the batch axes' sizes."""
    return int(np.prod([mesh.shape[axis] for axis in batch_axes(mesh)], dtype=int))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Splits dimension 0 over the batch axes and replicates the rest."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, *, what: str = "batch_size") -> None:
    """Raises `ShardingError` unless `batch_size` splits evenly over the batch axes."""
    size = data_parallel_size(mesh)
    if batch_size % size:
        axes = " x ".join(f"{axis}={mesh.shape[axis]}" for axis in batch_axes(mesh))
        raise ShardingError(
            f"{what}={batch_size} is not divisible by the data-parallel size {size} "
            f"({axes}); choose a multiple of {size} or a smaller mesh"
        )


# ------------------------------------------------------------------ parameter shardings


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """How parameters and optimizer state are laid out over a mesh.

    For each array, the first rule that applies decides:

    1. `overrides`: (regex, spec) pairs; the regex is searched in the array's path name
       (e.g. "params/layers/0/kernel", "opt_state/0/mu/layers/0/kernel"), spec is one
       entry per leading dimension: a mesh axis name or None.
    2. NNX partition metadata on the variable (`out_sharding` / `sharding_names`):
       names that are axes of the mesh are used, other (logical) names mean "not split".
    3. FSDP: when the mesh has `fsdp_axis` with size > 1 and the array has at least
       `min_size` entries, its largest dimension divisible by the axis size is split
       over it (ties: the earlier dimension). Everything else is replicated.

    Hashable, so compiled programs can be cached on it.
    """

    fsdp_axis: str = "fsdp"
    min_size: int = 2**12
    overrides: tuple[tuple[str, tuple[str | None, ...]], ...] = ()

    @classmethod
    def parse(cls, text: str, **kwargs) -> ShardingRules:
        """Rules from `"regex=axis,None;regex2="` (empty spec: replicated); see the class.

        Raises:
          ShardingError: an entry without "=" or an invalid regex.
        """
        overrides = []
        for part in filter(None, (p.strip() for p in text.split(";"))):
            pattern, sep, spec = part.partition("=")
            if not sep:
                raise ShardingError(
                    f"sharding rule {part!r}: expected 'regex=axis,None,...' "
                    "(e.g. 'embedding=fsdp,None'; an empty right side replicates)"
                )
            try:
                re.compile(pattern)
            except re.error as error:
                raise ShardingError(f"sharding rule {part!r}: bad regex: {error}") from None
            names = tuple(
                None if name.strip() in ("", "None", "_") else name.strip()
                for name in spec.split(",")
            )
            overrides.append((pattern.strip(), () if names == (None,) else names))
        return cls(overrides=tuple(overrides), **kwargs)

    def spec(self, path: str, shape: tuple[int, ...], mesh: Mesh, names=None) -> PartitionSpec:
        """The `PartitionSpec` of one array (see the class for the order of the rules).

        Raises:
          ShardingError: an override names an axis the mesh lacks, has more entries than
            the array has dimensions, or splits a dimension its axis size does not divide.
        """
        for pattern, spec in self.overrides:
            if re.search(pattern, path):
                _check_spec(path, shape, mesh, spec, f"sharding rule {pattern!r}")
                return PartitionSpec(*spec)
        if names is not None and len(names) == len(shape):
            spec = tuple(name if name in mesh.shape else None for name in names)
            pairs = zip(spec, shape, strict=True)
            if all(n is None or dim % mesh.shape[n] == 0 for n, dim in pairs):
                return PartitionSpec(*spec)
        ways = mesh.shape.get(self.fsdp_axis, 1)
        if ways > 1 and int(np.prod(shape, dtype=int)) >= self.min_size:
            for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
                if shape[dim] % ways == 0:
                    return PartitionSpec(*([None] * dim + [self.fsdp_axis]))
        return PartitionSpec()


def _check_spec(path, shape, mesh, spec, source) -> None:
    if len(spec) > len(shape):
        raise ShardingError(f"{source} gives {path!r} (shape {shape}) too many entries {spec}")
    for axis, dim in zip(spec, shape, strict=False):  # spec may cover fewer dims
        if axis is None:
            continue
        if axis not in mesh.shape:
            raise ShardingError(f"{source}: axis {axis!r} is not in the mesh {dict(mesh.shape)}")
        if dim % mesh.shape[axis]:
            raise ShardingError(
                f"{source}: {path!r} dimension of size {dim} does not split over "
                f"{axis}={mesh.shape[axis]}"
            )


def state_shardings(state: Any, mesh: Mesh, rules: ShardingRules | None = None) -> list:
    """One `NamedSharding` per leaf of `state` (in `jax.tree.leaves` order), by `rules`."""
    rules = rules or ShardingRules()
    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    shardings = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]:
        names = None
        if is_variable(leaf):
            metadata = leaf.get_metadata()
            names = metadata.get("out_sharding", metadata.get("sharding_names"))
            leaf = leaf.get_value()
        shape = tuple(np.shape(leaf))
        spec = rules.spec(path_name(path), shape, mesh, names)
        shardings.append(NamedSharding(mesh, spec))
    return shardings


def shard_state(state: Any, mesh: Mesh, rules: ShardingRules | None = None) -> Any:
    """Places every array of `state` (e.g. a `TrainState`) on `mesh` by `rules`.

    Works in a multi-process run too: there, each process passes its own identical
    copy of an unplaced state. Arrays already placed as asked are returned as they are.

    Raises:
      ShardingError: see `ShardingRules.spec`.
    """
    leaves, treedef = jax.tree.flatten(state)
    shardings = state_shardings(state, mesh, rules)
    placed = [_place(leaf, sharding) for leaf, sharding in zip(leaves, shardings, strict=True)]
    return jax.tree.unflatten(treedef, placed)


def place_data(arrays: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Puts a data set's arrays on `mesh`: global arrays stay, others are replicated.

    Replication keeps on-device shuffling a local gather; a multi-process run passes
    arrays built by `global_arrays` (rows split over the processes), which stay as they
    are, and the gather inside the compiled program fetches rows across devices.
    """
    placed = {}
    for name, value in arrays.items():
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            placed[name] = value
        else:
            placed[name] = _place(value, replicated(mesh))
    return placed


def place_batches(tree: Any, batch: NamedSharding) -> Any:
    """Host arrays (num_batches, batch_size, ...) placed with their rows split like `batch`.

    Axis 1 is split over the batch axes of `batch` (a mesh's `batch_sharding`) when
    its size divides evenly; otherwise the arrays are replicated (a small eval set
    still works, each device evaluating all of it). Every process passes the same
    arrays.
    """
    mesh = batch.mesh

    def place(value):
        value = np.asarray(value)
        fits = value.ndim >= 2 and value.shape[1] % data_parallel_size(mesh) == 0
        spec = PartitionSpec(None, *batch.spec) if fits else PartitionSpec()
        return _place(value, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if sharding.is_fully_addressable or (
        isinstance(value, jax.Array) and not value.is_fully_addressable
    ):
        return jax.device_put(value, sharding)
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # e.g. a dropout stream key
        data = _place(jax.random.key_data(value), sharding)  # (..., 2): spec covers leading dims
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(value)  # every process holds the same copy of an unplaced array
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass(frozen=True)
class ChunkShardings:
    """The layout a compiled chunk of train steps keeps: hashable, for program caches.

    Attributes:
      state: one sharding per state leaf (`jax.tree.leaves` order).
      batch: the sharding of every batch array.
      scalars: the sharding of metrics (replicated, readable by every process).
    """

    state: tuple[NamedSharding, ...]
    batch: NamedSharding
    scalars: NamedSharding

    @classmethod
    def of(cls, state: Any, mesh: Mesh) -> ChunkShardings:
        """The shardings `state` is placed with now, and `mesh`'s batch sharding."""
        leaves = jax.tree.leaves(state)
        missing = [i for i, x in enumerate(leaves) if not isinstance(x, jax.Array)]
        if missing:
            raise ShardingError(f"state leaf {missing[0]} is not a placed jax.Array")
        shardings = tuple(
            x.sharding if isinstance(x.sharding, NamedSharding) else replicated(mesh)
            for x in leaves
        )
        return cls(shardings, batch_sharding(mesh), replicated(mesh))

    def constrain_state(self, state: Any) -> Any:
        """`state` with each leaf pinned to its layout (inside jit), so it never drifts."""
        leaves, treedef = jax.tree.flatten(state)
        pairs = zip(leaves, self.state, strict=True)
        return jax.tree.unflatten(
            treedef, [jax.lax.with_sharding_constraint(x, s) for x, s in pairs]
        )

    def constrain_batch(self, batch: Any) -> Any:
        """`batch` with every array split over the batch axes along its first dimension."""
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.batch), batch)

    def constrain_scalars(self, tree: Any) -> Any:
        """`tree` (e.g. step metrics) replicated on every device."""
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.scalars), tree)


# ------------------------------------------------------------------------ multi-process


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts JAX's distributed runtime when this is one of several processes.

    Arguments left None come from the environment variables `JAX_COORDINATOR_ADDRESS`
    ("host:port"), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`. With one process (or none
    configured) it does nothing, so single-machine runs need no set-up. On CPU it
    selects gloo collectives, which cross-process CPU programs need.

    Must be called before anything touches a device. Returns True if it initialised.

    Raises:
      ShardingError: a coordinator without a process count or id, or an id out of range.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if num_processes is None or num_processes <= 1:
        return False
    if coordinator is None or process_id is None or not 0 <= process_id < num_processes:
        raise ShardingError(
            f"a run of {num_processes} processes needs a coordinator address 'host:port' "
            f"and a process id in [0, {num_processes}); got coordinator={coordinator!r}, "
            f"process_id={process_id!r}"
        )
    if jax.distributed.is_initialized():
        return False
    if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu").split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def process_rows(num_examples: int, mesh: Mesh | None = None) -> slice:
    """The rows of an N-example data set that this process loads (a contiguous block).

    The data set is cut to the largest multiple of the mesh's batch-axis size (all
    devices when `mesh` is None) so that rows split evenly over the devices; the cut
    rows (fewer than that size) are never used by any process.
    """
    shards = len(jax.devices()) if mesh is None else data_parallel_size(mesh)
    usable = num_examples - num_examples % shards
    per_process = usable // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def global_arrays(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Joins each process's rows (from `process_rows`) into global arrays on `mesh`.

    Rows are split over the batch axes, so each device stores only its share. With one
    process this is simply `jax.device_put` with that sharding.

    Raises:
      ShardingError: the local row count does not split over this process's devices.
    """
    sharding = batch_sharding(mesh)
    local_devices = len(mesh.local_devices)
    shards_per_process = data_parallel_size(mesh) * local_devices // mesh.size
    result = {}
    for name, value in local.items():
        value = np.asarray(value)
        if len(value) % max(shards_per_process, 1):
            raise ShardingError(
                f"{name!r}: {len(value)} local rows do not split over {shards_per_process} "
                "batch shards of this process; load the rows given by jdl.process_rows"
            )
        result[name] = jax.make_array_from_process_local_data(sharding, value)
    return result


def place_for_fit(
    state: Any,
    train_data: Any,
    mesh: Mesh | None,
    rules: ShardingRules | None = None,
) -> tuple[Any, ChunkShardings | None]:
    """What `fit` does before training: place the state and the data, pick the layout.

    With `mesh`, the state is placed by `rules` (`shard_state`) and the data places
    itself (`TrainData.place_on_mesh`, given the mesh's batch sharding and `place_data`):
    arrays held on the device (`InMemoryData`, `RandomWindows`) are replicated, host-fed
    data (`StreamingData`, `IterableData`) without a `sharding` of its own sends its
    batches split over the batch axes. Without, a state that is already on a multi-device
    mesh keeps its placement. The returned `ChunkShardings` (None on a single device) is
    what the chunk program keeps.

    Raises:
      jdl.data.pipeline.TrainDataError: `train_data` is not a `jdl.TrainData`.
      ShardingError: the batch size does not split over the mesh's batch axes (checked
        before anything compiles), or a sharding rule does not fit.
    """
    check_train_data(train_data)
    placed = mesh is None
    mesh = mesh_of(state) if mesh is None else mesh
    if mesh is None:
        return state, None
    check_batch_size(train_data.batch_size, mesh)
    if not placed:
        state = shard_state(state, mesh, rules)
    train_data.place_on_mesh(
        MeshPlacement(mesh, batch_sharding(mesh), lambda arrays: place_data(arrays, mesh))
    )
    return state, ChunkShardings.of(state, mesh)
