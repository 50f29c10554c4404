"""The platform and chip a program is compiled for, as far as tracing can see it.

Backends choose their kernels and tiles for the *compilation target*, never for the
host that traces the program: a program traced on a CPU host and compiled for an
H100 or a TPU v5e (compile-only devices, or ``jax.export``) must get the kernel it
would get there. Tracing sees the target in two ways:

- through a mesh: under ``jax.set_mesh`` or with arguments sharded over a mesh,
  the mesh's abstract device names the platform and the chip;
- from concrete arguments (eager calls): the device the arrays live on.

Otherwise (``jax.jit`` with unsharded arguments) only the platform is decided, late,
by :func:`jax.lax.platform_dependent`, and a backend uses tiles that compile on every
supported chip of that platform (``device_kind=None``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

# jax's platform names -> the backend family that serves them.
_FAMILY = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu"}


class Target(NamedTuple):
    """A compilation target: ``platform`` is ``"cpu"``, ``"gpu"`` or ``"tpu"`` (or
    another jax platform name); ``device_kind`` names the chip (e.g. ``"TPU v5
    lite"``, ``"NVIDIA H100 80GB HBM3"``) or is None when any chip of the platform
    may run the program."""

    platform: str
    device_kind: str | None = None


def _from(platform: str, kind: str | None) -> Target:
    return Target(_FAMILY.get(platform.lower(), platform.lower()), kind)


def known_target(*arrays) -> Target | None:
    """The target named by the context mesh, an argument's mesh or an argument's
    device; None when tracing cannot tell (then use :func:`jax.lax.platform_dependent`)."""
    meshes = [jax.sharding.get_abstract_mesh()]
    for a in arrays:
        if a is None:
            continue
        sharding = getattr(jax.typeof(a), "sharding", None)
        meshes.append(getattr(sharding, "mesh", None))
    for mesh in meshes:
        device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
        if device is not None:
            return _from(device.platform, device.device_kind)
    for a in arrays:
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
            devices = list(a.devices())
            if devices:
                return _from(devices[0].platform, devices[0].device_kind)
    return None


def mesh_target(mesh) -> Target | None:
    """The target of a (concrete or abstract) mesh's devices."""
    abstract = getattr(mesh, "abstract_mesh", mesh)
    device = getattr(abstract, "abstract_device", None)
    return None if device is None else _from(device.platform, device.device_kind)


# The platforms ``jax.lax.platform_dependent`` distinguishes for an unknown target.
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def platform_target(platform: str) -> Target:
    """The target of a ``platform_dependent`` branch: the platform, any chip."""
    return _from(platform, None)
