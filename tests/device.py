"""Where the unit tests put their tiny models: the CPU, or EDITCOLLAPSE_TEST_DEVICE (e.g. cuda) to check the
CUDA path on a machine that has one."""
import os

DEVICE = os.environ.get("EDITCOLLAPSE_TEST_DEVICE", "cpu")
