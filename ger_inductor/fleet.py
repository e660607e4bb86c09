"""Device profiles: what ger knows about the device a graph runs on.

A profile is detected per device from a graph's example inputs (a graph on cuda:0 and
one on the CPU in the same process get different profiles) or pinned by name with
the ``device_profile`` option, so every per-device choice can be tested on a CPU
machine. Pinned profiles are data, in one table (:data:`PINNED_PROFILES`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """What ger needs to know about a device to choose a strategy."""

    name: str
    device_type: str  # torch device type: cpu, cuda (also ROCm), xpu, mps, meta, ...
    vendor: str  # nvidia, amd (GPUs); x86, arm (CPUs); unknown
    arch: str  # sm90, gfx942, avx512, ...
    warp_size: int = 1  # threads per warp/wavefront; 1 on CPUs
    multiprocessors: int | None = None  # SMs / CUs / cores
    shared_mem_per_block: int | None = None  # bytes
    l2_bytes: int | None = None
    bf16: bool = True
    fp16: bool = True
    fp8: bool = False
    inductor_codegen: str = "cpp"  # what Inductor generates: cpp, triton, none
    layout_opt: bool = True  # whether Inductor's channels_last layout optimisation applies
    pinned: bool = False
    note: str = ""

    def to_json_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def family(self) -> str:
        """Coarse family used by strategy tables: cpu, nvidia, amd, other."""
        if self.device_type == "cpu":
            return "cpu"
        if self.vendor in ("nvidia", "amd"):
            return self.vendor
        return "other"


def _p(**kw) -> DeviceProfile:
    return DeviceProfile(pinned=True, **kw)


#: The parts a fleet mixes. Figures from vendor data sheets (per device).
PINNED_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        _p(name="a100", device_type="cuda", vendor="nvidia", arch="sm80", warp_size=32, multiprocessors=108,
           shared_mem_per_block=166912, l2_bytes=40 * 2**20, fp8=False, inductor_codegen="triton"),
        _p(name="h100", device_type="cuda", vendor="nvidia", arch="sm90", warp_size=32, multiprocessors=132,
           shared_mem_per_block=232448, l2_bytes=50 * 2**20, fp8=True, inductor_codegen="triton"),
        _p(name="h200", device_type="cuda", vendor="nvidia", arch="sm90", warp_size=32, multiprocessors=132,
           shared_mem_per_block=232448, l2_bytes=60 * 2**20, fp8=True, inductor_codegen="triton"),
        _p(name="mi250x", device_type="cuda", vendor="amd", arch="gfx90a", warp_size=64, multiprocessors=110,
           shared_mem_per_block=65536, l2_bytes=8 * 2**20, fp8=False, inductor_codegen="triton", layout_opt=False),
        _p(name="mi300x", device_type="cuda", vendor="amd", arch="gfx942", warp_size=64, multiprocessors=304,
           shared_mem_per_block=65536, l2_bytes=4 * 2**20, fp8=True, inductor_codegen="triton", layout_opt=False),
        _p(name="cpu-avx512", device_type="cpu", vendor="x86", arch="avx512", bf16=True, inductor_codegen="cpp"),
        _p(name="cpu-avx2", device_type="cpu", vendor="x86", arch="avx2", bf16=False, inductor_codegen="cpp"),
        _p(name="cpu-arm", device_type="cpu", vendor="arm", arch="neon/sve", bf16=False, inductor_codegen="cpp"),
    )
}


def _cpu_profile() -> DeviceProfile:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        cap = "DEFAULT"
    cap_l = cap.lower()
    if "avx512" in cap_l:
        base = PINNED_PROFILES["cpu-avx512"]
    elif "avx2" in cap_l:
        base = PINNED_PROFILES["cpu-avx2"]
    elif "sve" in cap_l or "neon" in cap_l:
        base = PINNED_PROFILES["cpu-arm"]
    else:
        import platform

        base = PINNED_PROFILES["cpu-arm" if platform.machine() in ("aarch64", "arm64") else "cpu-avx2"]
    import os

    return dataclasses.replace(base, pinned=False, arch=cap_l, multiprocessors=os.cpu_count(), name=f"{base.name}(detected)")


def _cuda_profile(index: int) -> DeviceProfile:
    props = torch.cuda.get_device_properties(index)
    is_hip = torch.version.hip is not None
    sm = getattr(props, "multi_processor_count", None)
    smem = getattr(props, "shared_memory_per_block_optin", None) or getattr(props, "shared_memory_per_block", None)
    l2 = getattr(props, "L2_cache_size", None)
    if is_hip:
        arch = getattr(props, "gcnArchName", "gfx").split(":")[0]
        warp = getattr(props, "warp_size", 64)
        known = {"gfx90a": "mi250x", "gfx942": "mi300x"}.get(arch)
        vendor = "amd"
    else:
        arch = f"sm{props.major}{props.minor}"
        warp = getattr(props, "warp_size", 32)
        known = {"sm80": "a100", "sm90": "h100"}.get(arch)
        if known == "h100" and "H200" in props.name:
            known = "h200"
        vendor = "nvidia"
    if known is None:
        known = nearest_known(vendor, arch)
        log.warning(
            "ger: device %s (%s, %s) has no pinned profile; using the nearest known family %r",
            props.name, vendor, arch, known,
        )
    base = PINNED_PROFILES[known]
    return dataclasses.replace(
        base,
        name=f"{base.name}(detected)",
        arch=arch,
        warp_size=warp,
        multiprocessors=sm or base.multiprocessors,
        shared_mem_per_block=smem or base.shared_mem_per_block,
        l2_bytes=l2 or base.l2_bytes,
        bf16=(props.major >= 8) if not is_hip else base.bf16,  # of THIS device, not the current one
        pinned=False,
        note=props.name,
    )


def nearest_known(vendor: str, arch: str) -> str:
    """Nearest pinned profile for an unknown GPU: same vendor; Hopper-class (sm90) for
    sm90 and newer, Ampere-class (sm80) below; MI300X-class for gfx94x and newer."""
    if vendor == "amd":
        return "mi300x" if arch >= "gfx94" else "mi250x"
    try:
        num = int("".join(ch for ch in arch if ch.isdigit()))
    except ValueError:
        return "a100"
    return "h100" if num >= 90 else "a100"


def unsupported_profile(device: torch.device, reason: str) -> DeviceProfile:
    return DeviceProfile(
        name=f"{device.type}(no-inductor)", device_type=device.type, vendor="unknown", arch="unknown",
        inductor_codegen="none", note=reason,
    )


def profile_for_device(device: torch.device) -> DeviceProfile:
    from . import _compat

    if not _compat.has_inductor_backend(device.type):
        return unsupported_profile(device, f"Inductor has no code generator for device type {device.type!r}")
    if device.type == "cpu":
        return _cpu_profile()
    if device.type == "cuda":
        return _cuda_profile(device.index if device.index is not None else torch.cuda.current_device())
    return DeviceProfile(name=f"{device.type}(generic)", device_type=device.type, vendor="unknown", arch="unknown",
                         inductor_codegen="triton")


def devices_of(values: Iterable[Any]) -> list[torch.device]:
    seen: list[torch.device] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            d = v.device
            if d not in seen:
                seen.append(d)
    return seen


def select_profile(devices: list[torch.device], pinned: str) -> DeviceProfile:
    """The profile for a graph: pinned by option, else detected from its main device.

    The main device is the first accelerator among the graph's devices, else the CPU.
    """
    if pinned != "auto":
        return PINNED_PROFILES[pinned]
    if not devices:
        return _cpu_profile()
    main = next((d for d in devices if d.type != "cpu"), devices[0])
    return profile_for_device(main)


# ----------------------------------------------------------------------------- strategies
#: What each pattern family does on each profile family, and why. One table, read by
#: the passes and lowerings (through the functions below), the tests, the docs and
#: ``python -m ger_inductor fleet``.
STRATEGIES: dict[str, dict[str, dict[str, Any]]] = {
    "loss_entropy": {
        "cpu": dict(forward="rows", chunk=0, why=(
            "a vocabulary row stays in L2 between the max loop and the loop of sums (C++ has no "
            "online-softmax reduction); a split adds a combine kernel for nothing")),
        "nvidia": dict(forward="chunks", chunk=1024, why=(
            "split reduction: each chunk of 1024 classes is a persistent reduction (held in "
            "registers), so the logits are read once for the max and every sum; whole-row loops "
            "over 128k classes re-read the row from HBM")),
        "amd": dict(forward="chunks", chunk=1024, why=(
            "as on NVIDIA (Inductor's persistent-reduction limit is 1024 whatever the 64-wide "
            "wavefront); fewer, larger rows per CU suit the 304 CUs of an MI300X")),
        "other": dict(forward="rows", chunk=0, why="no profile-specific tuning: Inductor's defaults"),
    },
    "conv_bn_act": {
        "cpu": dict(eval_conv="onednn_post_op", train="stats_normalize_recompute", why=(
            "eval: oneDNN conv with the activation as post-op when no gradient is needed (no pass "
            "over the activations after the conv; channels_last inside the graph), else aten conv + "
            "folded bias; train: batch stats + normalize/activate, activation recomputed in backward")),
        "nvidia": dict(eval_conv="vendor_conv_bias", train="stats_normalize_recompute", why=(
            "eval: cuDNN conv with the folded bias, activation in Inductor's epilogue kernel (fused "
            "with what follows, e.g. a residual add); Inductor's layout optimisation picks channels_last")),
        "amd": dict(eval_conv="vendor_conv_bias", train="stats_normalize_recompute", why=(
            "as on NVIDIA with MIOpen; the profile turns Inductor's layout optimisation off "
            "(layout_opt=False: channels_last does not pay with MIOpen)")),
        "other": dict(eval_conv="vendor_conv_bias", train="stats_normalize_recompute", why=(
            "framework conv with the folded bias; activation fused by Inductor")),
    },
    "lm_head": {
        "cpu": dict(gradients="in_forward", chunk_mib=256, unroll=64, unroll_fp32=False, min_vocab=16384, autotune_min_mib=16, why=(
            "tokens in chunks whose (rows, V) fp32 logits buffer is ~256 MiB, large enough that the "
            "chunk matmuls run at the BLAS's full speed; gradients formed in the forward sweep "
            "(3 matmuls). fp32: the op's kernel (in-place passes over one reused buffer, grad_W "
            "accumulated in place by addmm_) beat the unrolled Inductor form, 17.5 s vs 19.5 s at "
            "4096x1024x128256; bf16: the unrolled form (one fused C++ kernel per chunk) beat the "
            "kernel, 5.9 s vs 7.1 s")),
        "nvidia": dict(gradients="in_forward", chunk_mib=512, unroll=64, min_vocab=16384, autotune_min_mib=16, why=(
            "chunks of ~1k rows at V=128k keep the cuBLAS matmuls and the fused Triton row "
            "kernels wide enough to fill 100+ SMs; still O(chunk x V), never N x V")),
        "amd": dict(gradients="in_forward", chunk_mib=512, unroll=64, min_vocab=16384, autotune_min_mib=16,
                    why="as on NVIDIA, with rocBLAS/hipBLASLt"),
        "other": dict(gradients="in_forward", chunk_mib=256, unroll=0, min_vocab=16384, autotune_min_mib=16,
                      why="the CPU choice: bounded memory first"),
    },
}


def lm_head_chunk(profile: DeviceProfile, num_classes, override: int | None = None) -> int:
    """Rows per chunk of the fused lm-head loss: ``override`` if given, else the rows
    whose fp32 (rows, V) buffer fits the profile's ``chunk_mib`` (a multiple of 64,
    at least 64). A symbolic V gives 0: the op then sizes the chunk at run time."""
    if override:
        return int(override)
    if not isinstance(num_classes, int):
        return 0
    budget = int(strategy("lm_head", profile)["chunk_mib"]) << 20
    rows = budget // max(1, 4 * num_classes)
    return max(64, rows // 64 * 64)


def inductor_patches(profile: DeviceProfile) -> dict[str, Any]:
    """Inductor settings a profile implies: no channels_last layout optimisation where the
    profile says it does not pay (AMD Instinct; Inductor's own ROCm default as well)."""
    return {} if profile.layout_opt else {"layout_optimization": False}


def strategy(family: str, profile: DeviceProfile) -> dict[str, Any]:
    """The strategy ``family`` uses on ``profile`` (a copy, with the profile's name)."""
    table = STRATEGIES[family]
    choice = dict(table.get(profile.family, table["other"]))
    choice["profile"] = profile.name
    return choice


def loss_chunk(device: torch.device, num_classes: int | None = None, profile: DeviceProfile | None = None) -> int:
    """Chunk size of the GER loss forward on this device (0: whole-row reductions).

    Rows that fit one chunk are reduced whole (a single persistent reduction already).
    """
    prof = profile if profile is not None else _profile_cached(device)
    k = int(strategy("loss_entropy", prof)["chunk"])
    if k and isinstance(num_classes, int) and num_classes <= k:
        return 0
    return k


_PROFILE_CACHE: dict[str, DeviceProfile] = {}


def _profile_cached(device: torch.device) -> DeviceProfile:
    key = str(device)
    if key not in _PROFILE_CACHE:
        _PROFILE_CACHE[key] = profile_for_device(device)
    return _PROFILE_CACHE[key]


def strategy_table(include_local: bool = True) -> list[dict[str, Any]]:
    """Rows of (profile, family, strategy) for every pinned profile and the local devices."""
    profiles = list(PINNED_PROFILES.values())
    if include_local:
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        profiles += [profile_for_device(d) for d in devices]
    rows = []
    for p in profiles:
        for fam in STRATEGIES:
            s = strategy(fam, p)
            rows.append({"profile": p.name, "family": fam, **{k: v for k, v in s.items() if k != "profile"}})
    return rows


def format_strategy_table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        choice = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("profile", "family", "why"))
        out.append(f"{r['profile']:22s} {r['family']:13s} {choice}\n{'':36s}why: {r['why']}")
    return "\n".join(out)
