"""Forward hooks on the real tiny model that tests use instead of timing."""

import pytest


@pytest.fixture
def endless(lm):
    """Stories run to their full length: the output layer never proposes a stop token."""
    stops = sorted(lm.stop_ids)

    def no_stop(module, inputs, logits):
        logits[..., stops] = float("-inf")
        return logits

    hook = lm.model.get_output_embeddings().register_forward_hook(no_stop)
    yield
    hook.remove()
