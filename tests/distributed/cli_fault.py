"""``rlhf-fast`` under torchrun with a fault injected on one rank after the ranks joined their
process group, for tests/test_distributed_trainers.py: ``FAULT_RANK`` (default 1) and
``FAULT_KIND`` — ``value`` (a user error, ValueError, at the second SFT step) or ``hang`` (that
rank sleeps instead of taking the step, so its peers wait in a collective). Everything after
the script name is the ``rlhf-fast`` command line."""

import os
import sys
import time

from rlhf_fast.trainers import sft

_step = sft.SFTTrainer.train_step


def _faulty_step(self):
    if self.step == 1 and self.ctx.rank == int(os.environ.get("FAULT_RANK", "1")):
        if os.environ.get("FAULT_KIND", "value") == "hang":
            time.sleep(600)
        raise ValueError("injected fault on this rank")
    return _step(self)


sft.SFTTrainer.train_step = _faulty_step

if __name__ == "__main__":
    from rlhf_fast.cli import entry

    sys.argv = ["rlhf-fast"] + sys.argv[1:]
    entry()
