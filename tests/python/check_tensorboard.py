"""Reads a run's TensorBoard event files with TensorBoard's own EventAccumulator, as the
TensorBoard UI does, and checks the scalars a user looks for:

    check_tensorboard.py DIR STEPS TAG[=N] TAG==V ...

Every TAG must be present; a bare TAG must have one value for each of the steps 0..STEPS-1, a
TAG=N exactly N values, a TAG=* at least one, a TAG==V the value V at its last step. Prints the
tags found.
"""
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

directory, steps, *wanted = sys.argv[1:]
acc = EventAccumulator(directory, size_guidance={"scalars": 0})
acc.Reload()
found = set(acc.Tags()["scalars"])
print("tags:", " ".join(sorted(found)))
for spec in wanted:
    tag, _, last = spec.partition("==")
    tag, _, count = tag.partition("=")
    assert tag in found, f"{tag} missing from {sorted(found)}"
    events = acc.Scalars(tag)
    if last:
        value = max(events, key=lambda e: e.step).value
        assert value == float(last), f"{tag}: {value} at its last step, expected {last}"
        continue
    got = sorted(e.step for e in events)
    if count == "*":
        assert got, f"{tag} has no value"
    elif count:
        assert len(got) == int(count), f"{tag}: {len(got)} values at {got}, expected {count}"
    else:
        assert got == list(range(int(steps))), f"{tag}: steps {got}, expected 0..{steps}"
    assert all(e.value == e.value for e in events), f"{tag} holds NaN"
print(f"tensorboard ok: {len(wanted)} tags checked")
