"""What a measured figure names as its machine."""
import torch

from editcollapse import machine


def test_the_machine_is_described_with_its_cpu_flags_and_threads():
    d = machine.describe()
    assert d["cpu"] and set(d["flags"]) <= set(machine.FLAGS) and d["torch_threads"] == torch.get_num_threads()
    line = machine.summary(d)
    assert line.startswith(d["cpu"]) and f"{d['torch_threads']} torch threads" in line
    assert machine.summary(dict(d, flags=[], gpu="H200")).endswith("torch threads, GPU H200)")
