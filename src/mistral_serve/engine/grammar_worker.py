"""A grammar worker: a process of its own that compiles grammars for the serving process.

    python -m mistral_serve.engine.grammar_worker      (started by GrammarWorkerPool)

It speaks over its stdin and stdout in frames (an 8-byte length, then that many bytes): first the
pool sends its settings and the vocabulary, once; the worker answers when it is ready; then, one
at a time, a spec in and a reply out:

    {"kind", "spec"}  →  {"status": "compiled", "cpu_s", "is_carried"} [+ the grammar as JSON]
                         {"status": "invalid", "message"}
                         {"status": "out_of_memory"}

A compiled grammar is carried back (serialised) only when it took more CPU than the pool would
spend compiling it again (grammar_bounds.MAX_RECOMPILE_CPU_S). Before compiling anything the
worker lowers its own priority and caps its own address space, so a grammar that explodes costs
this process, never the server. Its replies are plain JSON and bytes, never pickles: the worker
runs what clients send, and nothing it says can run code in the server.
"""

from __future__ import annotations

import json
import os
import resource
import select
import struct
import threading
import time

from mistral_serve.engine.client import GuidedDecodingError
from mistral_serve.engine.params import GuidedDecoding

_LENGTH = struct.Struct(">Q")
_VOCAB_LENGTH = struct.Struct(">I")


# frames, for both sides

def write_frame(fd: int, data: bytes) -> None:
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_frame(fd: int, deadline: float | None = None) -> bytes:
    """One frame from `fd`. EOFError when the other side is gone, TimeoutError past `deadline`
    (time.monotonic()); None waits for ever."""
    (length,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size, deadline))
    return _read_exactly(fd, length, deadline)


def _read_exactly(fd: int, num_bytes: int, deadline: float | None) -> bytes:
    chunks = []
    poller = select.poll()  # not select.select: a busy server's descriptors go past 1024
    poller.register(fd, select.POLLIN)
    while num_bytes:
        if deadline is not None:
            timeout_s = deadline - time.monotonic()
            if timeout_s <= 0 or not poller.poll(timeout_s * 1000):
                raise TimeoutError
        chunk = os.read(fd, min(num_bytes, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        num_bytes -= len(chunk)
    return b"".join(chunks)


def pack_vocab(vocab: list[bytes]) -> bytes:
    return b"".join(_VOCAB_LENGTH.pack(len(token)) + token for token in vocab)


def unpack_vocab(data: bytes) -> list[bytes]:
    vocab, offset = [], 0
    while offset < len(data):
        (length,) = _VOCAB_LENGTH.unpack_from(data, offset)
        offset += _VOCAB_LENGTH.size
        vocab.append(data[offset:offset + length])
        offset += length
    return vocab


# the worker

def main() -> None:
    replies = os.dup(1)  # the protocol's own stdout
    os.dup2(2, 1)  # anything else printed goes to stderr, never into a reply
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    settings = json.loads(read_frame(0))
    os.nice(settings["niceness"])
    vocab = unpack_vocab(read_frame(0))
    # imported only now, at the lower priority: xgrammar takes seconds to import (it brings torch)
    from mistral_serve.engine.guided import new_compiler, tokenizer_info

    compiler = new_compiler(tokenizer_info(vocab, settings["vocab_size"], settings["stop_token_ids"]), max_threads=1)
    del vocab
    _cap_address_space(settings["max_memory_bytes"])
    write_frame(replies, json.dumps({"is_ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            request = json.loads(read_frame(0))
        except EOFError:  # the pool closed the pipe, or the serving process is gone
            return
        reply, grammar_json = _compile(compiler, request, settings["max_recompile_cpu_s"])
        write_frame(replies, json.dumps(reply).encode())
        if grammar_json is not None:
            write_frame(replies, grammar_json)


def _compile(compiler, request: dict, max_recompile_cpu_s: float) -> tuple[dict, bytes | None]:
    from mistral_serve.engine.guided import compile_guided  # imported by main already

    started = time.process_time()
    try:
        grammar = compile_guided(compiler, GuidedDecoding(request["kind"], request["spec"]))
        cpu_s = time.process_time() - started
        grammar_json = _serialize(grammar) if cpu_s > max_recompile_cpu_s else None
    except GuidedDecodingError as error:
        return {"status": "invalid", "message": str(error)}, None
    except MemoryError:
        return {"status": "out_of_memory"}, None
    return {"status": "compiled", "cpu_s": cpu_s, "is_carried": grammar_json is not None}, grammar_json


def _serialize(grammar) -> bytes:
    try:
        return grammar.serialize_json().encode()
    except RuntimeError as error:
        if "bad_alloc" in str(error):  # the JSON can be a hundred times the grammar's size
            raise MemoryError from error
        raise


def _exit_with_parent(parent_pid: int) -> None:
    """Exit when the serving process is gone, even in the middle of a compilation (which releases the
    GIL): nobody would read its result, and only that process's timeout would have stopped it."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _cap_address_space(max_more_bytes: int) -> None:
    """Allow `max_more_bytes` of address space beyond what the worker holds now: allocations past it
    fail, and the compilation with them."""
    with open("/proc/self/statm") as statm:
        num_bytes_now = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = num_bytes_now + max_more_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


if __name__ == "__main__":
    main()
