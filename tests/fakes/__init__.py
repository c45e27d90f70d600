"""Local stand-ins for the chat platforms' servers; the real client libraries talk to them."""
