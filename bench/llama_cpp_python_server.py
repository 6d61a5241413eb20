"""llama-cpp-python's OpenAI server with ggml's extra buffer types off: what llama-server's
`--no-repack` does, which llama-cpp-python's server has no setting for.

peers.py runs the server through this on CPUs with tile units (Intel's AMX). Built for such a CPU,
the llama.cpp that llama-cpp-python 0.3.36 vendors puts the weights in its AMX buffers, and its AMX
matmul then runs a tile instruction on a thread whose tiles it has not configured: the server dies
with SIGILL on its first request. Without the extra buffer types ggml runs its AVX-512 kernels.

    python bench/llama_cpp_python_server.py --model FILE.gguf --port 8001   # the server's own flags
"""

import sys

import llama_cpp.llama_cpp as llama_cpp_library
from llama_cpp.server.__main__ import main

_default_model_params = llama_cpp_library.llama_model_default_params


def _without_extra_buffer_types():
    params = _default_model_params()
    params.use_extra_bufts = False
    return params


if __name__ == "__main__":
    # llama_cpp.Llama takes its defaults from this function each time it loads a model
    llama_cpp_library.llama_model_default_params = _without_extra_buffer_types
    sys.argv[0] = "llama_cpp.server"
    main()
