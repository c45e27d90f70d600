"""Generation on remote OpenAI-compatible servers (vLLM, llama.cpp's llama-server, another StoryBot).

client.py talks to one server, pool.py keeps the servers in rotation and routes to them,
worker.py runs the fair queue in front of the pool and resumes a story whose server fails.
"""
