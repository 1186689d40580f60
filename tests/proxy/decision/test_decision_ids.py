"""Decision ids (`proxy.decision.gate.new_decision_id`): version 4 UUIDs as uuid4 writes them, never repeated,
and a forked child never gives its parent's next ids."""

from __future__ import annotations

import os
import uuid

from proxy.decision.gate import new_decision_id


def test_a_decision_id_is_a_random_uuid_in_its_usual_text_form():
    ids = [new_decision_id() for _ in range(2000)]  # several pools' worth
    assert len(set(ids)) == len(ids)
    for text in ids[:300]:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_a_forked_child_gives_ids_of_its_own():
    new_decision_id()  # the parent has a pool under way
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, " ".join(new_decision_id() for _ in range(5)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split())
    os.waitpid(pid, 0)
    parent = {new_decision_id() for _ in range(5)}
    assert len(child) == 5
    assert not child & parent
