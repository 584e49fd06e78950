"""What the site and the coordinator both need (the lowest layer).

Importing any fedtune package first imports this one (each package's ``__init__`` does), so the
filter below is in place before PEFT is imported anywhere: with bitsandbytes installed
(`model.quantization`), ``import peft`` imports it, and it imports a torch module that uses the
deprecated ``torch.jit.script_method`` at import time. That is torch's own deprecation, raised
on every run whether or not anything is quantized; it says nothing to a user of fedtune.

bitsandbytes also tries, at import, to fetch an optional CPU kernel from a hub through the
`kernels` package; that package is not installed (fedtune fetches nothing from a hub), so it
falls back to its own kernel, which is the intended path, and its warning about it is silenced.
"""

import logging
import warnings

__version__ = "0.1.0"

warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning
)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
