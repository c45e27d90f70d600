"""Local stand-ins for chat platforms, for tests that run the real client libraries against them."""
