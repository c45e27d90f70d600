import pytest

from storygen.errors import QueueFullError, TooManyRequestsError
from storygen.scheduler import FairQueue


def _drain(queue):
    order = []
    while (peeked := queue.peek()) is not None:
        popped = queue.pop()
        assert popped == peeked  # peek names what pop takes next, and leaves it
        order.append(popped[0])
    assert queue.pop() is None
    return order


def test_round_robin_between_users():
    queue = FairQueue(max_queued=100, max_per_user=100)
    for i in range(3):
        queue.push(f"a{i}", "a", i)
    for i in range(2):
        queue.push(f"b{i}", "b", i)
    queue.push("c0", "c", 0)
    assert _drain(queue) == ["a0", "b0", "c0", "a1", "b1", "a2"]


def test_newcomer_goes_before_a_flood():
    queue = FairQueue(max_queued=100, max_per_user=100)
    for i in range(20):
        queue.push(f"x{i}", "x", i)
    assert queue.pop()[0] == "x0"  # x has one running now
    queue.push("y0", "y", 0)
    assert queue.position("y0") == 0
    assert queue.pop()[0] == "y0"


def test_position_matches_service_order():
    queue = FairQueue(max_queued=100, max_per_user=100)
    for key, user in [("a0", "a"), ("a1", "a"), ("b0", "b"), ("a2", "a"), ("c0", "c")]:
        queue.push(key, user, None)
    positions = {key: queue.position(key) for key in ("a0", "a1", "a2", "b0", "c0")}
    order = _drain(queue)
    assert positions == {key: order.index(key) for key in positions}
    assert queue.position("a0") is None


def test_per_user_cap_counts_running_and_queued():
    queue = FairQueue(max_queued=100, max_per_user=2)
    queue.push("a0", "a", 0)
    queue.pop()
    queue.push("a1", "a", 1)
    with pytest.raises(TooManyRequestsError, match="you already have 2 stories in progress"):
        queue.push("a2", "a", 2)
    queue.finished("a")
    queue.push("a2", "a", 2)


def test_global_cap_answers_at_once_with_a_wait():
    queue = FairQueue(max_queued=2, max_per_user=5)
    queue.push("a", "u1", 0)
    queue.push("b", "u2", 0)
    with pytest.raises(QueueFullError, match=r"busy, try again in about 42 s"):
        queue.push("c", "u3", 0, retry_after=lambda: 41.6)
    assert len(queue) == 2


def test_remove_and_push_front():
    queue = FairQueue(max_queued=10, max_per_user=10)
    for key in ("a0", "a1", "a2"):
        queue.push(key, "a", key)
    assert queue.remove("a1") == "a1" and queue.remove("a1") is None
    key, _ = queue.pop()
    queue.push_front(key, "a", key)  # preempted: back at the head, no longer counted as running
    assert _drain(queue) == ["a0", "a2"]


@pytest.mark.parametrize("served, first", [(True, "b0"), (False, "a0")])
def test_an_item_put_back_goes_after_newer_users_only_if_its_admission_counted(served, first):
    """The worker's prefill pieces: a flooder's piece was their turn; a lone request's was not."""
    queue = FairQueue(max_queued=100, max_per_user=100)
    queue.push("a0", "a", 0)
    assert queue.pop() == ("a0", 0)
    queue.push("b0", "b", 0)
    queue.push_front("a0", "a", 0, served=served)
    assert queue.in_progress("a") == 1  # queued again, no longer running
    assert _drain(queue) == [first, "b0" if first == "a0" else "a0"]
