"""streammem.memory: bounded, snapshot-able memories behind one contract (see ``base.py``).

``build_memory(name, **cfg)`` builds one by registry name:

========================  ===========================================================
``pyramid``               :class:`PyramidMemory` (VideoChat-Online PMB); ``preset=``
                          ``"ovbench"`` (2/2/12) or ``"offline"`` (24/24/144)
``dual``                  :class:`DualMemory` (Mem4D static / dynamic)
``posekv``                :class:`PoseKVMemory` (RELIC compressed pose-aware KV)
``feature_bank``          :class:`FeatureBank` (MAMBA)
``error_bank``            :class:`ErrorBank` (Stable Video Infinity)
``kvcache``               :class:`KVCacheMemory` (a bounded cache run by a press)
``window``                :class:`WindowMemory` (baseline: the newest frames)
``uniform``               :class:`UniformMemory` (baseline: frames spread over the past)
``empty``                 :class:`EmptyMemory` (baseline: holds nothing)
``full``                  :class:`FullMemory` (baseline: every frame, pooled, up to a bound)
========================  ===========================================================

``read`` takes a typed query (:class:`FeatureQuery`, :class:`PoseQuery`,
:class:`TimestepQuery`) where a memory retrieves; capabilities beyond ``read`` are protocols
(:class:`SupportsRows`, :class:`SupportsQuery`, :class:`SupportsKV`, :class:`SupportsSample`,
:class:`SupportsFrames`) that heads check with ``isinstance``.

Example:
    >>> mem = build_memory("pyramid", preset="offline", dim=16)
    >>> mem.capacity
    9984
"""

from typing import Any

from streammem.memory.base import MEMORY_KINDS, Memory, MemoryConfig
from streammem.memory.baselines import EmptyMemory, FramesConfig, FullConfig, FullMemory, UniformMemory, WindowMemory
from streammem.memory.dual import DualConfig, DualMemory
from streammem.memory.error_bank import ErrorBank, ErrorBankConfig
from streammem.memory.feature_bank import FeatureBank, FeatureBankConfig
from streammem.memory.kvcache import KVCacheConfig, KVCacheMemory
from streammem.memory.posekv import RELIC_SCHEDULE, PoseKVConfig, PoseKVMemory
from streammem.memory.posekv_cache import PoseKVCache
from streammem.memory.presses import (
    PRESSES, ComposedPress, H2OPress, KVMergerPress, MiKVPress, Press, SinkWindowPress, build_press,
)
from streammem.memory.protocols import (
    FeatureQuery, PoseQuery, SupportsFrames, SupportsKV, SupportsQuery, SupportsRows, SupportsSample, TimestepQuery,
)
from streammem.memory.pyramid import PYRAMID_PRESETS, PYRAMID_SPREAD, PyramidConfig, PyramidMemory


def build_memory(name: str, **cfg: Any) -> Memory:
    """Build the memory registered as ``name`` from config fields (``preset=`` for pyramid)."""
    if name not in MEMORY_KINDS:
        raise ValueError(f"unknown memory {name!r}; known: {sorted(MEMORY_KINDS)}")
    if name == "pyramid" and "preset" in cfg:
        return PyramidMemory.from_preset(cfg.pop("preset"), **cfg)
    return MEMORY_KINDS[name](**cfg)


__all__ = [
    "Memory", "MemoryConfig", "MEMORY_KINDS", "build_memory",
    "PyramidMemory", "PyramidConfig", "PYRAMID_PRESETS", "PYRAMID_SPREAD",
    "DualMemory", "DualConfig",
    "PoseKVMemory", "PoseKVConfig", "RELIC_SCHEDULE", "PoseKVCache",
    "FeatureBank", "FeatureBankConfig",
    "ErrorBank", "ErrorBankConfig",
    "KVCacheMemory", "KVCacheConfig",
    "WindowMemory", "UniformMemory", "EmptyMemory", "FullMemory", "FramesConfig", "FullConfig",
    "FeatureQuery", "PoseQuery", "TimestepQuery",
    "SupportsRows", "SupportsQuery", "SupportsKV", "SupportsSample", "SupportsFrames",
    "Press", "ComposedPress", "SinkWindowPress", "H2OPress", "KVMergerPress", "MiKVPress", "PRESSES", "build_press",
]
