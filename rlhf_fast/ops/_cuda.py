"""Registration of the CUDA C++ implementations (csrc/cuda/*.cu in rlhf_fast._C) with the
dispatch."""

from . import _dispatch  # noqa: F401
