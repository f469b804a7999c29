"""How the multi-process tests start their ranks: two processes under torchrun on a free port."""

import sys

#: ``torchrun --standalone --nproc_per_node 2``; the tests add the script (or ``-m module``) and its arguments
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
