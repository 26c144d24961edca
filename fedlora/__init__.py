"""fedlora: federated LoRA fine-tuning of language models on Flower."""

import logging

from fedlora.quiet import quiet_third_parties

__version__ = "0.1.0"

# bitsandbytes (fedlora[quantize]) is imported by peft whenever it is installed, and logs on
# import that an optional CPU kernel package, fetched from a model hub, is missing: noise on
# every command's stderr. fedlora uses its plain kernels.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
quiet_third_parties()  # transformers' load reports and library warnings: only with --verbose
