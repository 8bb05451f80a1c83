"""Registration of the Triton implementations (kernels/*.py, shipped as rlhf_fast.kernels)
with the dispatch. Lazy "module:attr" paths, so `import rlhf_fast` never imports Triton."""

from . import _dispatch  # noqa: F401
