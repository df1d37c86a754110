"""Produce records the Python client refuses to build (header names that are not UTF-8).

confluent-kafka only takes ``str`` header names, so a record with a raw byte header name
is produced here through librdkafka itself: the copy bundled in the confluent-kafka wheel,
called with ctypes (``rd_kafka_produceva``, no varargs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import confluent_kafka

_VTYPE_TOPIC = 1
_VTYPE_PARTITION = 3
_VTYPE_VALUE = 4
_VTYPE_KEY = 5
_VTYPE_HEADER = 9


class _Mem(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class _Header(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("val", ctypes.c_void_p), ("size", ctypes.c_ssize_t)]


class _Value(ctypes.Union):
    _fields_ = [
        ("cstr", ctypes.c_char_p),
        ("i32", ctypes.c_int32),
        ("mem", _Mem),
        ("header", _Header),
        ("pad", ctypes.c_char * 64),
    ]


class _Vu(ctypes.Structure):
    _fields_ = [("vtype", ctypes.c_int), ("u", _Value)]


def _librdkafka() -> ctypes.CDLL:
    libs = Path(confluent_kafka.__file__).parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so*")) if libs.is_dir() else []
    path = str(found[0]) if found else ctypes.util.find_library("rdkafka")
    if path is None:
        raise RuntimeError("librdkafka not found next to confluent_kafka")
    lib = ctypes.CDLL(path)
    lib.rd_kafka_conf_new.restype = ctypes.c_void_p
    lib.rd_kafka_conf_set.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.rd_kafka_new.restype = ctypes.c_void_p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rd_kafka_produceva.restype = ctypes.c_void_p
    lib.rd_kafka_produceva.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Vu), ctypes.c_size_t]
    lib.rd_kafka_error_string.restype = ctypes.c_char_p
    lib.rd_kafka_error_string.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_error_destroy.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_flush.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.rd_kafka_outq_len.argtypes = [ctypes.c_void_p]
    lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
    return lib


def produce_raw(
    bootstrap: str,
    topic: str,
    *,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[bytes, bytes]],
    partition: int = 0,
) -> None:
    """Produce one record with raw byte header names and wait for it to be acknowledged."""
    lib = _librdkafka()
    errstr = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    for name, val in (("bootstrap.servers", bootstrap), ("acks", "all")):
        if lib.rd_kafka_conf_set(conf, name.encode(), val.encode(), errstr, 512) != 0:
            raise RuntimeError(errstr.value.decode())
    rk = lib.rd_kafka_new(0, conf, errstr, 512)  # 0: RD_KAFKA_PRODUCER; takes over conf
    if not rk:
        raise RuntimeError(errstr.value.decode())
    keep: list[object] = []  # the buffers must outlive the produce call
    try:
        vus: list[_Vu] = []
        vu = _Vu(_VTYPE_TOPIC)
        vu.u.cstr = topic.encode()
        vus.append(vu)
        vu = _Vu(_VTYPE_PARTITION)
        vu.u.i32 = partition
        vus.append(vu)
        for vtype, data in ((_VTYPE_KEY, key), (_VTYPE_VALUE, value)):
            if data is not None:
                buf = ctypes.create_string_buffer(data, len(data))
                keep.append(buf)
                vu = _Vu(vtype)
                vu.u.mem = _Mem(ctypes.cast(buf, ctypes.c_void_p), len(data))
                vus.append(vu)
        for raw_name, raw_value in headers:
            nbuf = ctypes.create_string_buffer(raw_name)  # NUL-terminated copy
            vbuf = ctypes.create_string_buffer(raw_value, len(raw_value))
            keep += [nbuf, vbuf]
            vu = _Vu(_VTYPE_HEADER)
            vu.u.header = _Header(
                ctypes.cast(nbuf, ctypes.c_char_p),
                ctypes.cast(vbuf, ctypes.c_void_p),
                len(raw_value),
            )
            vus.append(vu)
        array = (_Vu * len(vus))(*vus)
        error = lib.rd_kafka_produceva(rk, array, len(vus))
        if error:
            message = lib.rd_kafka_error_string(error).decode()
            lib.rd_kafka_error_destroy(error)
            raise RuntimeError(f"produce failed: {message}")
        lib.rd_kafka_flush(rk, 30_000)
        if lib.rd_kafka_outq_len(rk) != 0:
            raise RuntimeError("record not acknowledged within 30 s")
    finally:
        lib.rd_kafka_destroy(rk)
