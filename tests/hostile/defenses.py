"""Hostile submissions (issue 16, case 1): test fixtures for ``robustmatrix submit``. Each class
builds like a normal defense and misbehaves in ``forward`` (or ``__init__``). Imported only in
the sandboxed child by the tests, never in the test process."""

import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from defenses.base import Defense


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


#: where Forks' grandchild writes its pid (a fixed path: the sandbox child does not inherit the
#: test's environment through the forkserver)
MARKER = os.path.join(tempfile.gettempdir(), f"robustmatrix-forks-{os.getuid()}.pid")


class _Base(Defense):
    def __init__(self, dataset="test_tiny"):
        super().__init__(Net(), num_classes=10)


class Sleeps(_Base):
    def forward(self, x):
        time.sleep(3600)


class Allocates(_Base):
    def forward(self, x):
        hoard = []
        while True:
            hoard.append(torch.ones(64 << 20, dtype=torch.uint8))  # 64 MiB at a time


class Exits(_Base):
    def forward(self, x):
        os._exit(0)  # a silent "success" if run in the submit process


class Forks(_Base):
    def forward(self, x):
        marker = MARKER
        # a grandchild that would outlive the run: it writes its pid, then sleeps
        subprocess.Popen([sys.executable, "-c",
                          f"import os, time; open({marker!r}, 'w').write(str(os.getpid())); "
                          "time.sleep(3600)"])
        time.sleep(3600)


class RaisesInInit(Defense):
    def __init__(self, dataset="test_tiny"):
        raise RuntimeError("broken constructor")


#: when this file exists, SleepsLater's forward sleeps: it behaves at submission and hangs when
#: `verify` or `sweep` runs it again
SLEEP_MARKER = os.path.join(tempfile.gettempdir(), f"robustmatrix-sleep-later-{os.getuid()}")


class SleepsLater(_Base):
    def forward(self, x):
        if os.path.exists(SLEEP_MARKER):
            time.sleep(3600)
        return super().forward(x)
